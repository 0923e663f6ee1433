"""The R²ec model: one causal LM, two heads (SPEC §3). The LM head writes the reasoning; the
rec head is the final normalised hidden state h at the last non-pad token, scored against the
item table by cosine / τ.

    model, tokenizer = load_backbone("gemma")        # any key, alias, folder or hub id (paths.py)
    model = add_lora(model)                          # r=4, alpha=128 on attention and MLP
    logprobs, h = policy_forward(model, ids, mask, n)  # one forward for both heads
    logprobs, h = shared_prompt_forward(model, prompts, prompt_mask, reasonings, mask, prompt_of)  # prompts once
    table = ItemTable(item_info, tokenizer, "Video_Games"); items = list(range(len(table)))
    table.update(items, table.encode(model, items))  # H_V, (N+1, D)
    scores = mask_seen(similarity(h, table.embeddings), history_item_ids)  # (B, N+1)

There is one code path for every backbone: the model's own forward (so Gemma-2's logit
soft-capping applies), PEFT-wrapped or not, gradient checkpointing on or off. No per-model
classes. Tests: `pytest tests/test_model.py`.
"""
import glob
import json
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError
from jinja2 import TemplateError
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from errors import UserError, one_line
from paths import embedded_folder, resolve_model
from prompts import ANSWER, MAX_ITEM_TOKENS, chat_prompt, item_prompt_tokens, left_pad

TAU = 0.02  # = τ, the temperature of the cosine score
LOAD_ERRORS = (OSError, ValueError, AttributeError, TypeError, KeyError,  # what loading bad files raises,
               StrictDataclassError)  # and a config.json the config class refuses (num_hidden_layers 0)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one of them
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 4, 128, 0.05  # SPEC §4
ITEM_BATCH_SIZE = 32  # items per forward when encoding the table
SHARED_PROMPT_LAYER_TYPES = {"full_attention", "sliding_attention"}  # the layers `attention_masks` covers
SIMILARITY_TYPES = ("cosine", "dot", "L2")  # the kinds `similarity` scores (--similarity_type)


def load_backbone(name_or_path: str, dtype: torch.dtype | None = torch.bfloat16):
    """(model, tokenizer) for a key, alias, folder or hub id; model dropout off, left padding."""
    path, config, tokenizer = load_backbone_config(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     attn_implementation=attention_implementation(config))
    except (OSError, ValueError, SafetensorError, AssertionError) as e:  # no or truncated weights, a config.json
        raise load_failure(name_or_path, path, e) from e                  # that builds no model (vocab_size 10)
    except RuntimeError as e:
        if "mismatched_sizes" not in str(e):
            raise
        mismatch = ValueError("its config.json does not fit its weights: their sizes differ (see the report above)")
        raise load_failure(name_or_path, path, mismatch) from e
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_folder_fix(path: str, fix: str) -> str:
    """`fix` for a model folder that would not load, unless it is the converted default backbone,
    which is converted again once deleted."""
    if os.path.realpath(path) == os.path.realpath(embedded_folder()):
        return f"delete {path} (the converted default backbone): the next run converts it again"
    return fix


def load_failure(name_or_path: str, path: str, error: Exception) -> UserError:
    """The one-line error of a model that would not load; a path that is no folder was a hub id."""
    fix = model_folder_fix(path, "point paths.py or --model at a complete model folder")
    if offline_and_not_cached(path):
        fix = (f"{path!r} is no local folder, so it was read as a hub id, which is not in the Hugging Face cache "
               f"and HF_HUB_OFFLINE=1 forbids downloading: download it first (hf download {path}), "
               f"or {fix}")
    elif not os.path.isdir(path):
        fix = f"{path!r} is no local folder, so it was read as a hub id: check the id and the connection, or {fix}"
    return UserError(f"cannot load model {name_or_path!r} from {path!r}: {one_line(error)} — {fix}")


def offline_and_not_cached(path: str) -> bool:
    """Whether `path` is a hub id that offline mode (HF_HUB_OFFLINE=1) cannot load: not in the cache."""
    return (is_offline_mode() and not os.path.isdir(path)
            and not isinstance(try_to_load_from_cache(path, "config.json"), str))


def load_backbone_config(name_or_path: str):
    """(path, config, tokenizer) of a backbone, checked, without its weights: the config with
    dropout off, the tokenizer with its chat template and left padding.

    Dropout probabilities are zeroed in the config before the model is built: attention
    modules copy them at construction, so changing the config afterwards would be too late.
    """
    path = resolve_model(name_or_path)
    tokenizer_fix = model_folder_fix(path, "copy the tokenizer files released with the model into it")
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise UserError(f"model folder {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) — "
                        f"{tokenizer_fix}")
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:  # no config or tokenizer, unknown model type, files of the wrong shape
        raise load_failure(name_or_path, path, e) from e
    instruct_fix = model_folder_fix(path, "R²ec needs an instruction-tuned backbone (…-it, …-Instruct) with the "
                                          "tokenizer files it was released with")
    check_tokenizer(tokenizer, f"model {name_or_path!r} ({path!r})", tokenizer_fix, no_template_fix=instruct_fix)
    for sub in decoder_configs(config):
        for key, value in vars(sub).items():
            if "dropout" in key and isinstance(value, float):
                setattr(sub, key, 0.0)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # the mask, not the id, tells padding apart, so eos is safe
        tokenizer.pad_token = tokenizer.eos_token
    return path, config, tokenizer


def check_weights(path: str):
    """What loading a local model folder's weights would refuse, from the files' headers alone
    (for --check_only): no weight files, a shard named by the index missing, a truncated or
    damaged .safetensors file. A hub id's weights are checked as they download."""
    if not os.path.isdir(path):
        return
    fix = model_folder_fix(path, "finish copying or downloading the model, or point paths.py or --model at a "
                                 "complete model folder")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index) and not os.path.isfile(os.path.join(path, "model.safetensors")):  # loaded first
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} cannot be read ({one_line(e)}) — {fix}") from e
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
        if missing:
            raise UserError(f"model folder {path!r} lacks {missing[0]}, a part of its weights named in "
                            f"{os.path.basename(index)} — {fix}")
    weights = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not weights and not glob.glob(os.path.join(glob.escape(path), "*.bin")):
        raise UserError(f"model folder {path!r} has no weights (*.safetensors or *.bin) — {fix}")
    for file in weights:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"model weights {file!r} cannot be read ({one_line(e)}) — {fix}") from e


def check_tokenizer(tokenizer, owner: str, fix: str, no_template_fix: str | None = None):
    """A tokenizer that loads but encodes nothing (transformers builds one from a tokenizer_config.json
    whose vocabulary file is missing), or whose chat template is missing (`no_template_fix`, if
    another than `fix`), broken or drops the user's text, fails here, not in the stop rule or the
    first prompt."""
    if not tokenizer(ANSWER, add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer of {owner} turns text into no tokens (its vocabulary file, e.g. "
                        f"tokenizer.json, is missing?) — {fix}")
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {owner} has no chat template (chat_template.jinja) — "
                        f"{no_template_fix or fix}")
    probe = "Recommend an item."
    try:
        prompt = chat_prompt(tokenizer, probe)
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:  # an edited template
        raise UserError(f"the chat template of {owner} cannot be rendered ({one_line(e)}) — {fix}") from e
    if probe not in prompt:
        raise UserError(f"the chat template of {owner} leaves out the user's message — {fix}")


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing, as Trainer turns it on when train() starts with
    --gradient_checkpointing; for code that runs the update outside train() (tests, benchmarks)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # 5.17 has only the old name


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Token ids that end the assistant's turn: the tokenizer's eos and the generation config's
    (Gemma-2-it's `<end_of_turn>`, Qwen2.5-Instruct's `<|im_end|>` and `<|endoftext|>`)."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in (tokenizer.eos_token_id, *ids) if i is not None}


def attention_implementation(config) -> str | None:
    """"eager" for models with attention soft-capping (Gemma-2), whose SDPA path some transformers
    versions (5.17) run without it; None (the default, SDPA) for the rest."""
    return "eager" if any(getattr(c, "attn_logit_softcapping", None) for c in decoder_configs(config)) else None


def decoder_configs(config) -> list:
    """The config and, in a multimodal wrapper, the decoder's own config inside it: the decoder may
    read settings from either."""
    return list({id(c): c for c in (config, config.get_text_config())}.values())


def add_lora(model, r: int = LORA_R, alpha: int = LORA_ALPHA, dropout: float = LORA_DROPOUT,
             target_modules=LORA_TARGETS):
    """Wrap the backbone with LoRA adapters (SPEC §4 defaults); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model  # import cost only for training

    check_lora_targets(model, target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def check_lora_targets(model, target_modules):
    """Every LoRA target names modules of the model (a weightless skeleton will do)."""
    modules = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
    missing = [name for name in target_modules if name not in modules]
    if missing:
        linear = sorted(name for name, module in modules.items() if isinstance(module, torch.nn.Linear))
        raise UserError(f"LoRA targets {', '.join(missing)} are not modules of this backbone (its linear layers: "
                        f"{', '.join(linear)}) — fix --lora_target_modules")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row, for left or right padding."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (left padding reads 0, right padding
    repeats the last real position), so padding changes nothing.  (B, T) -> (B, T) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_positions(input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """`logits_to_keep` for the last n positions, as explicit indices rather than the int n.

    transformers slices the hidden states with it: indices give a contiguous copy, a slice a
    strided view, and PyTorch's CPU matmul copies the whole LM head once per row for a strided
    (B, n, D) input whose weight needs no gradient (seconds per call at a 49k vocabulary).
    """
    length = input_ids.shape[1]
    return torch.arange(length - n, length, device=input_ids.device)


def unwrapped(model):
    """The transformers or PEFT model inside DDP/DeepSpeed wrappers, which hold it as `.module`
    (DeepSpeed's engine also forwards other attributes, `get_decoder` included, to it)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@contextmanager
def eval_mode(model):
    """Eval mode (dropout off, no checkpointing) and no gradients for the block, every module's own
    mode restored after: `model.train(was_training)` would also switch modules that were
    deliberately left in eval mode (frozen parts) to training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: the trainer feeds rollout ids into autograd
            yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def decoder_hook(model, hook):
    """`hook(module, args, output)` on the model's decoder for the block; output[0] is h before
    the LM head. PEFT forwards `get_decoder` to the base model."""
    handle = unwrapped(model).get_decoder().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def policy_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_logprob_tokens: int,
                   temperature: float = 1.0):
    """One forward for both heads: (log-probs of the last n tokens, h).

    logprobs (B, n): log π(token | prefix) for the last n tokens of each row, π = softmax(logits
    / temperature), with logits computed only for the last n + 1 positions (`logits_to_keep`: the
    n predictors, and the last position, whose logits are dropped), never over the rest of the
    prompt. Positions whose token or predicting token is padding (right-padded reasonings, rows
    shorter than n + 1) read 0.
    h (B, D): the decoder's output (after its final norm) at the last non-pad token.

    h is caught with a forward hook on the decoder instead of `output_hidden_states=True`,
    which would keep every layer's states alive; the decoder's output is held anyway as the
    LM head's input. Position ids count only real tokens, so left padding changes nothing.
    """
    if num_logprob_tokens >= input_ids.shape[1]:
        raise ValueError(f"num_logprob_tokens={num_logprob_tokens} needs more than {input_ids.shape[1]} input tokens")
    position_ids = mask_positions(attention_mask)  # (B, T)
    caught = {}
    with decoder_hook(model, lambda module, args, out: caught.update(hidden=out[0])):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=last_positions(input_ids, num_logprob_tokens + 1),
            use_cache=False,
        )
    hidden = caught["hidden"]  # (B, T, D)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    h = hidden[rows, last_token_index(attention_mask)]  # (B, D)
    n = num_logprob_tokens
    if n == 0:
        return hidden.new_zeros(input_ids.shape[0], 0, dtype=torch.float32), h
    targets = input_ids[:, -n:]  # (B, n)
    # One row at a time in float32: without gradient (its use here: the rollout reference) one
    # row's float32 logits and log-softmax exist at a time, not (B, n, V) of each; with gradient,
    # backward would keep every row's log-softmax. `shared_prompt_forward` does the same per reasoning.
    logprobs = torch.stack([chosen_logprobs(logits[:-1], target, temperature)
                            for logits, target in zip(out.logits, targets)])  # (B, n)
    valid = attention_mask[:, -n:].bool() & attention_mask[:, -n - 1 : -1].bool()  # (B, n), predictor real too
    return torch.where(valid, logprobs, 0.0), h


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position, in float32.  logits (n, V), targets (n,) -> (n,)"""
    scores = logits.float()
    if temperature != 1:
        scores = scores / temperature
    return torch.log_softmax(scores, -1).gather(-1, targets[:, None]).squeeze(-1)


def shared_prompt_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                          completion_mask: torch.Tensor, prompt_of: list[int], temperature: float = 1.0):
    """`policy_forward` of M [prompt | reasoning] sequences whose prompts repeat (a user's G
    reasonings), each distinct prompt run once: (log-probs of each reasoning, h).

    A row of the batch holds one prompt followed by all of its reasonings. A reasoning attends
    to the prompt and to its own earlier tokens only, its positions continuing from the prompt's
    end, so each gets what `policy_forward` gives on its own [prompt | reasoning] row, while the
    prompt costs one pass instead of G (with LoRA dropout, one dropout mask serves the G copies).

    prompt_ids, prompt_mask (U, P): the distinct prompts, left-padded; completion_ids,
    completion_mask (M, C): the reasonings, right-padded; prompt_of: each reasoning's prompt row.
    -> logprobs (M, C), 0 on padding, π = softmax(logits / temperature); h (M, D) at each
    reasoning's last token.
    """
    device, width = prompt_ids.device, prompt_ids.shape[1]
    prompt_lens, lengths = prompt_mask.sum(1).tolist(), completion_mask.sum(1).tolist()
    members = [[m for m, owner in enumerate(prompt_of) if owner == u] for u in range(len(prompt_lens))]
    row_lens = [p + sum(lengths[m] for m in ms) for p, ms in zip(prompt_lens, members)]
    T, S = max(row_lens), max(n - p for n, p in zip(row_lens, prompt_lens))  # row width, longest reasoning part
    ids, positions, segments = [], [], []  # segment: -2 padding, -1 prompt, m reasoning m
    first = [0] * len(lengths)  # index of each reasoning's first token in its row
    for u, (p, ms) in enumerate(zip(prompt_lens, members)):
        pad = T - row_lens[u]
        ids += [prompt_ids.new_zeros(pad), prompt_ids[u, width - p:]]
        positions += [0] * pad + list(range(p))
        segments += [-2] * pad + [-1] * p
        start = pad + p
        for m in ms:
            ids.append(completion_ids[m, :lengths[m]])
            positions += range(p, p + lengths[m])
            segments += [m] * lengths[m]
            first[m], start = start, start + lengths[m]
    input_ids = torch.cat(ids).view(len(members), T)
    position_ids = torch.tensor(positions, device=device).view(len(members), T)
    segment = torch.tensor(segments, device=device).view(len(members), T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    seen = causal & ((segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None]))  # (U, T, T)
    caught = {}
    with decoder_hook(model, lambda module, args, out: caught.update(hidden=out[0])):
        out = model(input_ids=input_ids, attention_mask=attention_masks(model, seen, position_ids),
                    position_ids=position_ids, logits_to_keep=last_positions(input_ids, S + 1), use_cache=False)
    hidden, base = caught["hidden"], T - S - 1  # out.logits[:, i] is the logit at position base + i
    logprobs, h = [None] * len(lengths), [None] * len(lengths)
    # Split, not indexed per reasoning: each index op's backward would fill a logits-sized gradient.
    for u, (row_logits, ms) in enumerate(zip(out.logits, members)):
        head = first[ms[0]] - 1 - base  # rows before the prompt's last token
        _, prompt_last, *own = row_logits.split([head, 1, *(lengths[m] for m in ms)])
        for m, logits in zip(ms, own):  # the prompt's last token predicts every first token
            targets = completion_ids[m, :lengths[m]]
            chosen = torch.cat([chosen_logprobs(prompt_last, targets[:1], temperature),
                                chosen_logprobs(logits[:-1], targets[1:], temperature)])  # (n,)
            logprobs[m] = F.pad(chosen, (0, completion_ids.shape[1] - lengths[m]))
            h[m] = hidden[u, first[m] + lengths[m] - 1]
    return torch.stack(logprobs), torch.stack(h)


def in_sliding_window(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Whether a query sees a key under a sliding window: the key is fewer than `window` positions
    back, as transformers' masks have it (kv_idx > q_idx - window). Broadcasts."""
    return query_positions - key_positions < window


def attention_masks(model, seen: torch.Tensor, position_ids: torch.Tensor):
    """Additive (U, 1, T, T) masks that let query i see key j where seen[:, i, j], for the model's
    forward to use as they are: one tensor, or one per layer type ({"full_attention": ...,
    "sliding_attention": ...}) where the config lists layer types."""
    model = unwrapped(model)
    config = decoder_configs(model.config)[-1]
    dtype = model.get_input_embeddings().weight.dtype  # the queries' (under autocast SDPA casts the mask too)

    def additive(window):
        allowed = seen if window is None else seen & in_sliding_window(position_ids[:, :, None],
                                                                      position_ids[:, None, :], window)
        return torch.zeros(allowed.shape, dtype=dtype, device=seen.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    check_layer_types(config)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if not layer_types:
        return additive(getattr(config, "sliding_window", None))
    windows = {"full_attention": None, "sliding_attention": getattr(config, "sliding_window", None)}
    return {kind: additive(windows[kind]) for kind in layer_types}


def check_layer_types(config):
    """The update's shared-prompt masks (`attention_masks`) cover full and sliding-window attention
    layers; a backbone with other kinds (chunked, linear attention) is refused before training."""
    other = set(getattr(decoder_configs(config)[-1], "layer_types", None) or ()) - SHARED_PROMPT_LAYER_TYPES
    if other:
        raise UserError(f"the backbone has {', '.join(sorted(other))} layers, which the update's shared-prompt "
                        "masks do not cover (full and sliding-window attention only) — pick a backbone without "
                        "them (Gemma-2, Qwen2.5, Llama and most current models)")


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """h (B, D) alone: the rec head of user or item sequences."""
    return policy_forward(model, input_ids, attention_mask, 0)[1]


def similarity(user_h: torch.Tensor, item_h: torch.Tensor, kind: str = "cosine", tau: float = TAU) -> torch.Tensor:
    """Scores (B, N) of users (B, D) against items (N, D), in float32.

    cosine: (u/|u|)·(v/|v|)/τ (the paper's default); dot: u·v, no τ; L2: -|u - v|, no τ
    (higher is closer for all three).
    """
    user_h, item_h = user_h.float(), item_h.float()
    if kind == "cosine":
        return F.normalize(user_h, dim=-1) @ F.normalize(item_h, dim=-1).T / tau  # (B, N)
    if kind == "dot":
        return user_h @ item_h.T  # (B, N)
    if kind == "L2":
        # Not |u|² + |v|² - 2u·v (cdist's matmul path past 25 rows): with norms in the hundreds, as
        # LLM states have, float32 loses the small gaps between close items there.
        return -torch.cdist(user_h, item_h, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N)
    raise ValueError(f"unknown similarity {kind!r}: use one of {', '.join(SIMILARITY_TYPES)}")


def mask_seen(scores: torch.Tensor, history_item_ids: list[list[int]]) -> torch.Tensor:
    """Copy of scores (B, N) with each row's history items and the pad item (column 0) at -inf."""
    scores = scores.clone()
    rows = [i for i, ids in enumerate(history_item_ids) for _ in ids]
    cols = [j for ids in history_item_ids for j in ids]
    scores[:, 0] = float("-inf")
    scores[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = float("-inf")
    return scores


class ItemTable:
    """Every item's embedding H_V, one row per item id (row 0 is the pad item).

    Items are tokenised once, at construction. `encode` gives items' h with the current weights
    and `update` writes rows: every row before training and at every evaluation (the trainer
    splits that work between processes), and the rows a training step re-encoded with
    gradient. A resume may set `embeddings` from its checkpoint instead of the first encoding
    (RecPOTrainer.restore_item_table). `batch` gives the sequences to encode.
    """

    def __init__(self, item_info, tokenizer, category: str, batch_size: int = ITEM_BATCH_SIZE,
                 max_tokens: int = MAX_ITEM_TOKENS):
        items = sorted(item_info, key=lambda item: item["item_id"])  # a Dataset or a list of rows
        if [item["item_id"] for item in items] != list(range(len(items))):
            raise ValueError(f"item_info's item ids must be 0..{len(items) - 1}, each once")
        self.tokens = [item_prompt_tokens(tokenizer, item, category, max_tokens) for item in items]
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.embeddings = None  # (N+1, D) float32 after the first update

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, item_ids) -> dict:
        """Left-padded item sequences of these ids: dict(input_ids, attention_mask), (K, T)."""
        ids, mask = left_pad([self.tokens[int(i)] for i in item_ids], self.pad_id)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def encode(self, model, item_ids: list[int], progress: bool = True) -> torch.Tensor:
        """h of these items with the current weights (eval mode).  -> (K, D) float32, in their order."""
        device = next(model.parameters()).device
        by_length = sorted(range(len(item_ids)), key=lambda i: len(self.tokens[item_ids[i]]))  # less padding
        h = None
        with eval_mode(model):
            for start in tqdm(range(0, len(item_ids), self.batch_size), desc="encoding items", disable=not progress):
                chunk = by_length[start : start + self.batch_size]
                inputs = {k: v.to(device) for k, v in self.batch([item_ids[i] for i in chunk]).items()}
                chunk_h = encode(model, inputs["input_ids"], inputs["attention_mask"]).float()  # (k, D)
                if h is None:
                    h = chunk_h.new_empty(len(item_ids), chunk_h.shape[1])  # (K, D)
                h[torch.tensor(chunk, device=device)] = chunk_h
        return h

    def update(self, item_ids, h: torch.Tensor) -> None:
        """Write fresh embeddings h (K, D) of `item_ids` (K,) into the table, detached (the first
        write allocates it on h's device). An id given twice gets its last embedding: indexed
        assignment leaves the choice among duplicates unspecified on CUDA, and the processes'
        tables must stay equal."""
        if self.embeddings is None:
            self.embeddings = torch.zeros(len(self), h.shape[1], device=h.device)  # (N+1, D)
        rows = torch.as_tensor(item_ids, device=self.embeddings.device)
        unique, inverse = torch.unique(rows, return_inverse=True)
        # for each distinct id, the largest position it is given at
        last = torch.zeros_like(unique).scatter_reduce(0, inverse, torch.arange(len(rows), device=rows.device), "amax")
        self.embeddings[unique] = h.detach().to(self.embeddings.device, torch.float32)[last]
