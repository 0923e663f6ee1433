"""model.py: both heads from one forward, under either padding, PEFT and checkpointing;
scoring, masking, the item table, and the embedded SmolLM2 backbone."""
import json
import os
import re
import shutil

import pytest
import torch

from errors import UserError
from model import (ItemTable, add_lora, attention_implementation, check_layer_types, enable_checkpointing, encode,
                   end_of_turn_ids, load_backbone, load_backbone_config, mask_seen, policy_forward, similarity)
from paths import DEFAULT_MODEL, resolve_model
from prompts import chat_prompt, item_prompt_tokens
from tests.backbones import FAMILIES, tiny_backbone

TEXTS = ["The user plays the guitar every day and wants a tuner <answer>", "A piano for the kid? <answer>",
         "Vinyl records of the seventies, mostly rock"]
ITEMS = [
    {"item_id": 0, "title": "pad_title", "average_rating": 0.0, "rating_number": 0, "description": []},
    {"item_id": 1, "title": "Snark Clip-On Tuner", "average_rating": 4.6, "rating_number": 1523,
     "description": ["Tunes guitars.", "Clips on."]},
    {"item_id": 2, "title": "Yamaha Digital Piano", "average_rating": 4.8, "rating_number": 88, "description": []},
    {"item_id": 3, "title": "Ernie Ball Strings", "average_rating": 4.7, "rating_number": 9001,
     "description": ["Nickel wound."]},
]


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request):
    return load_backbone(tiny_backbone(request.param), dtype=torch.float32)


def unpadded(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)


def reference(model, input_ids, n):
    """h and log-probs of the last n tokens from a plain, unpadded, full-logits forward."""
    out = model(input_ids, output_hidden_states=True)
    logprobs = torch.log_softmax(out.logits[0, -n - 1 : -1], -1).gather(-1, input_ids[0, -n:, None])[:, 0]
    return out.hidden_states[-1][0, -1], logprobs


def test_logprobs_at_a_temperature_are_those_of_the_scaled_softmax(backbone):
    """log softmax(z / T)[y] = z_y / T - log Σ_v exp(z_v / T), written out from the plain logits."""
    model, tokenizer = backbone
    ids = unpadded(tokenizer, TEXTS[0])  # (1, L)
    n, T = 5, 2.0
    with torch.no_grad():
        logits = model(ids).logits[0, -n - 1 : -1].double()  # (n, V) predicting the last n tokens
        expected = logits.gather(-1, ids[0, -n:, None])[:, 0] / T - torch.logsumexp(logits / T, -1)
        logprobs, _ = policy_forward(model, ids, torch.ones_like(ids), n, temperature=T)
    torch.testing.assert_close(logprobs[0].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_h_and_logprobs_equal_unpadded_forwards(backbone, side):
    model, tokenizer = backbone
    tokenizer.padding_side = side
    batch = tokenizer(TEXTS, add_special_tokens=False, padding=True, return_tensors="pt")
    tokenizer.padding_side = "left"
    n = 4
    with torch.no_grad():
        logprobs, h = policy_forward(model, batch["input_ids"], batch["attention_mask"], n)
        for row, text in enumerate(TEXTS):
            h_ref, logprobs_ref = reference(model, unpadded(tokenizer, text), n)
            torch.testing.assert_close(h[row], h_ref, atol=1e-5, rtol=1e-4)
            if side == "left":  # right padding puts pads, not tokens, in the last n columns
                torch.testing.assert_close(logprobs[row], logprobs_ref, atol=1e-5, rtol=1e-4)


def test_left_padded_prompts_with_right_padded_reasonings(backbone):
    """The rollout layout: [pads, prompt, reasoning, pads]; h and log-probs ignore both pads."""
    model, tokenizer = backbone
    prompts = [unpadded(tokenizer, text)[0].tolist() for text in ("Which tuner?", "What would this user buy next?")]
    reasonings = [unpadded(tokenizer, text)[0].tolist() for text in ("A clip-on one <answer>", "Strings <answer>")]
    P, C = max(map(len, prompts)), max(map(len, reasonings))
    pad = tokenizer.pad_token_id
    rows = [[pad] * (P - len(p)) + p + r + [pad] * (C - len(r)) for p, r in zip(prompts, reasonings)]
    mask = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (C - len(r)) for p, r in zip(prompts, reasonings)]
    with torch.no_grad():
        logprobs, h = policy_forward(model, torch.tensor(rows), torch.tensor(mask), C)
        for row, (p, r) in enumerate(zip(prompts, reasonings)):
            h_ref, logprobs_ref = reference(model, torch.tensor([p + r]), len(r))
            torch.testing.assert_close(h[row], h_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(logprobs[row, : len(r)], logprobs_ref, atol=1e-5, rtol=1e-4)
            assert (logprobs[row, len(r):] == 0).all()


def test_padding_and_first_tokens_read_zero(backbone):
    model, tokenizer = backbone
    batch = tokenizer(["a", TEXTS[0]], add_special_tokens=False, padding=True, return_tensors="pt")
    length = int(batch["attention_mask"][0].sum())
    with torch.no_grad():
        logprobs, _ = policy_forward(model, batch["input_ids"], batch["attention_mask"], 6)
    assert torch.isfinite(logprobs).all() and (logprobs[1] < 0).all()
    assert (logprobs[0, : 7 - length] == 0).all() and (logprobs[0, 7 - length :] < 0).all()


def test_logits_only_for_the_requested_positions(backbone):
    model, tokenizer = backbone
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((out.shape[1], args[0].is_contiguous()))
    )
    batch = tokenizer(TEXTS, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        policy_forward(model, batch["input_ids"], batch["attention_mask"], 3)
        encode(model, batch["input_ids"], batch["attention_mask"])
    hook.remove()
    # contiguous: a strided input makes PyTorch's CPU matmul copy the LM head once per row
    assert seen == [(4, True), (1, True)]


def test_distributed_wrappers_are_seen_through(backbone):
    model, tokenizer = backbone

    class Wrapper(torch.nn.Module):  # the shape of a DDP wrapper: `.module` and a forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    batch = tokenizer(TEXTS, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        wrapped = policy_forward(Wrapper(model), batch["input_ids"], batch["attention_mask"], 2)
        plain = policy_forward(model, batch["input_ids"], batch["attention_mask"], 2)
    assert all(torch.equal(got, want) for got, want in zip(wrapped, plain))


def test_lora_with_checkpointing_gives_the_same_heads_and_gradients(backbone):
    model, tokenizer = backbone
    batch = tokenizer(TEXTS, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        logprobs, h = policy_forward(model, batch["input_ids"], batch["attention_mask"], 3)
    trained, _ = load_backbone(model.name_or_path, dtype=torch.float32)
    trained = add_lora(trained)
    enable_checkpointing(trained)
    trained.train()
    lora_logprobs, lora_h = policy_forward(trained, batch["input_ids"], batch["attention_mask"], 3)
    torch.testing.assert_close(lora_h, h, atol=1e-5, rtol=1e-4)  # B = 0 at start: same function
    torch.testing.assert_close(lora_logprobs, logprobs, atol=1e-5, rtol=1e-4)
    (lora_logprobs.sum() + lora_h.pow(2).sum()).backward()
    grads = [p.grad for name, p in trained.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_similarity_by_hand():
    u, v = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [6.0, 8.0], [-1.0, 0.0]])
    cosine = torch.tensor([[0.8, 1.0, -0.6], [0.0, 0.6, -1.0]])
    torch.testing.assert_close(similarity(u, v), cosine / 0.02)
    torch.testing.assert_close(similarity(u, v, "dot"), torch.tensor([[8.0, 50.0, -3.0], [0.0, 6.0, -1.0]]))
    torch.testing.assert_close(similarity(u, v, "L2")[0], -torch.tensor([13.0**0.5, 5.0, 32.0**0.5]))
    generator = torch.Generator().manual_seed(0)
    user = torch.randn(1, 256, generator=generator) * 25  # norm ~400, as LLM final states have
    items = user + 0.05 * torch.randn(200, 256, generator=generator)  # 0.8 away, within ~0.01 of each other
    exact = -(user.double() - items.double()).norm(dim=-1)  # (200,), in float64
    assert similarity(user, items, "L2")[0].argsort().tolist() == exact.argsort().tolist()
    with pytest.raises(ValueError, match="cosine, dot, L2"):
        similarity(u, v, "cos")


def test_mask_seen():
    scores = torch.zeros(2, 5)
    masked = mask_seen(scores, [[2, 4], []])
    inf = float("-inf")
    assert masked.tolist() == [[inf, 0, inf, 0, inf], [inf, 0, 0, 0, 0]] and (scores == 0).all()


def test_item_table_rows_follow_item_ids_and_match_single_encodes(backbone):
    model, tokenizer = backbone
    table = ItemTable(list(reversed(ITEMS)), tokenizer, "Musical_Instruments", batch_size=3)
    model.train()
    frozen = model.get_output_embeddings().eval()  # deliberately left in eval mode: stays so
    some = [3, 0, 2]
    torch.testing.assert_close(table.encode(model, some, progress=False),
                               table.encode(model, [0, 2, 3, 1], progress=False)[[2, 0, 1]], atol=1e-5, rtol=1e-4)
    table.update(range(4), table.encode(model, list(range(4)), progress=False))
    assert model.training and not frozen.training and table.embeddings.shape == (4, model.config.hidden_size)
    assert table.embeddings.dtype == torch.float32
    with torch.no_grad():
        for item in ITEMS:
            tokens = torch.tensor([item_prompt_tokens(tokenizer, item, "Musical_Instruments")])
            h = encode(model, tokens, torch.ones_like(tokens))[0]
            torch.testing.assert_close(table.embeddings[item["item_id"]], h, atol=1e-5, rtol=1e-4)
    batch = table.batch(torch.tensor([3, 1]))
    assert batch["input_ids"][0, -len(table.tokens[3]):].tolist() == table.tokens[3]
    fresh = torch.randn(2, model.config.hidden_size, requires_grad=True)
    table.update(torch.tensor([3, 1]), fresh)
    assert torch.equal(table.embeddings[[3, 1]], fresh.detach()) and not table.embeddings.requires_grad
    with pytest.raises(ValueError, match="item ids"):
        ItemTable(ITEMS[1:], tokenizer, "Musical_Instruments")


def test_item_table_update_keeps_the_last_embedding_of_a_repeated_id(backbone):
    _, tokenizer = backbone
    table = ItemTable(ITEMS, tokenizer, "Musical_Instruments")
    h = torch.arange(12.0).reshape(6, 2)  # rows for ids 2, 0, 2, 3, 3, 2
    table.update([2, 0, 2, 3, 3, 2], h)
    expected = torch.zeros(len(table), 2)
    expected[0], expected[2], expected[3] = h[1], h[5], h[4]
    assert torch.equal(table.embeddings, expected)


def test_batched_and_single_scoring_agree(backbone):
    model, tokenizer = backbone
    table = ItemTable(ITEMS, tokenizer, "Musical_Instruments")
    table.update(range(len(table)), table.encode(model, list(range(len(table))), progress=False))
    prompts = [chat_prompt(tokenizer, text) for text in TEXTS]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = mask_seen(similarity(encode(model, batch["input_ids"], batch["attention_mask"]), table.embeddings),
                           [[1], [], [2, 3]])
        for row, prompt in enumerate(prompts):
            tokens = unpadded(tokenizer, prompt)
            single = similarity(encode(model, tokens, torch.ones_like(tokens)), table.embeddings)[0]
            finite = torch.isfinite(scores[row])
            torch.testing.assert_close(scores[row][finite], single[finite], atol=1e-3, rtol=1e-4)
    assert torch.isfinite(scores).sum(1).tolist() == [2, 3, 1]


def test_load_backbone_turns_dropout_off_and_pads_left(tmp_path):
    folder = tmp_path / "dropout"
    shutil.copytree(tiny_backbone("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, attention_dropout=0.3)))
    model, tokenizer = load_backbone(str(folder), dtype=torch.float32)
    assert model.config.attention_dropout == 0.0 and model.model.layers[0].self_attn.attention_dropout == 0.0
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert model.dtype == torch.float32


def test_dropout_is_turned_off_inside_a_nested_text_config(tmp_path):
    """Gemma-3 4b and larger load as a vision-language config whose text config holds the dropout."""
    from transformers import Gemma3Config

    folder = tmp_path / "gemma3"
    shutil.copytree(tiny_backbone("gemma2"), folder)
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, attention_dropout=0.3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, attention_dropout=0.2)
    Gemma3Config(text_config=text, vision_config=vision).save_pretrained(folder)
    _, config, _ = load_backbone_config(str(folder))
    assert config.get_text_config().attention_dropout == 0.0
    assert config.vision_config.attention_dropout == 0.2  # the text model is the backbone; vision is never run


def test_end_of_turn_ids_join_the_tokenizer_and_the_generation_config():
    """Gemma-2-it ends its turn with <end_of_turn>, which only its generation config names; SmolLM2
    with <|im_end|>, its eos."""
    gemma, gemma_tokenizer = load_backbone(tiny_backbone("gemma2"), dtype=torch.float32)
    names = gemma_tokenizer.convert_ids_to_tokens(sorted(end_of_turn_ids(gemma, gemma_tokenizer)))
    assert sorted(names) == ["<end_of_turn>", "<eos>"]
    smol, smol_tokenizer = load_backbone(tiny_backbone("llama"), dtype=torch.float32)
    assert smol_tokenizer.convert_ids_to_tokens(sorted(end_of_turn_ids(smol, smol_tokenizer))) == ["<|im_end|>"]


def test_soft_capped_attention_runs_eager_also_inside_a_multimodal_config():
    from transformers import Gemma2Config, Gemma3Config, Qwen2Config

    assert attention_implementation(Gemma2Config()) == "eager"  # soft-capping 50 by default
    assert attention_implementation(Gemma3Config(text_config={"attn_logit_softcapping": 50.0})) == "eager"
    assert attention_implementation(Gemma3Config()) is None and attention_implementation(Qwen2Config()) is None


def test_a_folder_without_a_model_fails_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"has no config.json"):
        load_backbone(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # a config, but no model type, tokenizer or weights
    with pytest.raises(UserError, match=r"has no tokenizer files \(tokenizer.json, .*\) — copy the tokenizer"):
        load_backbone(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"cannot load model .* from .*: "):
        load_backbone(str(tmp_path))
    with pytest.raises(UserError, match=r"model folder '/no/such/model' does not exist — check the path"):
        load_backbone("/no/such/model")


def test_a_tokenizer_without_its_vocabulary_or_of_the_wrong_shape_fails_in_one_line(tmp_path):
    """transformers builds an empty tokenizer from a tokenizer_config.json alone (it encodes
    nothing, and the stop rule then failed with an IndexError); a config that is a list raised an
    AttributeError."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_backbone("qwen2"), folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"turns text into no tokens \(its vocabulary file, e.g. tokenizer.json, is missing\?\)"):
        load_backbone_config(str(folder))
    (folder / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(UserError, match=r"cannot load model .*(list' object has no attribute|list indices must be)"
                                        r".* — point paths.py or --model at a complete model folder"):  # 5.24, 5.17
        load_backbone_config(str(folder))


def test_a_backbone_without_a_chat_template_is_named(tmp_path):
    folder = tmp_path / "base_model"
    shutil.copytree(tiny_backbone("llama"), folder)
    os.remove(folder / "chat_template.jinja")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    with pytest.raises(UserError, match=re.escape("has no chat template (chat_template.jinja) — R²ec needs an "
                                                  "instruction-tuned backbone")):
        load_backbone(str(folder))


@pytest.mark.parametrize("edit, reason, checked", [
    ({"num_hidden_layers": 0}, "`num_hidden_layers` (0) must be equal to the number of `layer_types` (2)", True),
    ({"vocab_size": 10}, "Padding_idx must be within num_embeddings", True),  # torch's assert
    ({"hidden_size": 128}, "its config.json does not fit its weights: their sizes differ (see the report above)",
     False),  # --check_only reads no weights
])
def test_a_config_json_that_does_not_fit_the_model_is_named(tmp_path, edit, reason, checked):
    """A hand-edited config.json: a refused value, a model that cannot be built, or sizes that do not
    match the weights ended in a traceback (StrictDataclassError, AssertionError, RuntimeError)."""
    import train

    folder = tmp_path / "model"
    shutil.copytree(tiny_backbone("qwen2"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    expected = f"cannot load model {str(folder)!r} from {str(folder)!r}: "
    with pytest.raises(UserError) as caught:
        load_backbone(str(folder), dtype=torch.float32)
    assert str(caught.value).startswith(expected) and reason in str(caught.value)
    assert str(caught.value).endswith("— point paths.py or --model at a complete model folder")
    flags = ["--model", str(folder), "--dataset_dir", "/nonexistent", "--output_dir", str(tmp_path / "run")]
    if checked:
        with pytest.raises(UserError, match=re.escape(expected)):
            train.check_backbone(train.parse_config(flags))


def test_a_backbone_whose_chat_template_does_not_render_is_named(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_backbone("qwen2"), folder)
    (folder / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content | nosuchfilter }}")
    with pytest.raises(UserError) as caught:
        load_backbone_config(str(folder))
    assert str(caught.value).startswith(f"the chat template of model {str(folder)!r} ({str(folder)!r}) cannot be "
                                        "rendered (")
    assert str(caught.value).endswith("— copy the tokenizer files released with the model into it")


def test_missing_or_truncated_weights_fail_in_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_backbone("llama"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"cannot load model .*complete model folder"):
        load_backbone(str(folder), dtype=torch.float32)
    weights.unlink()
    with pytest.raises(UserError, match=r"cannot load model .*complete model folder"):
        load_backbone(str(folder), dtype=torch.float32)
    monkeypatch.setenv("R2EC_CACHE_DIR", str(tmp_path))
    converted = folder.rename(tmp_path / DEFAULT_MODEL)  # as if the embedded default's conversion were cut short
    with pytest.raises(UserError, match=re.escape(f"— delete {converted} (the converted default backbone): the next")):
        load_backbone(str(converted), dtype=torch.float32)


def test_the_converted_default_without_its_tokenizer_or_template_is_to_be_converted_again(tmp_path, monkeypatch):
    """Not "copy the tokenizer files released with the model": the default's come from its GGUF."""
    monkeypatch.setenv("R2EC_CACHE_DIR", str(tmp_path))
    converted = tmp_path / DEFAULT_MODEL
    shutil.copytree(tiny_backbone("llama"), converted)
    (converted / "chat_template.jinja").unlink()
    fix = f"— delete {converted} (the converted default backbone): the next run converts it again"
    with pytest.raises(UserError, match=re.escape(f"has no chat template (chat_template.jinja) {fix}")):
        load_backbone_config(str(converted))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (converted / name).unlink()
    with pytest.raises(UserError, match=re.escape(f"has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                                  f"tokenizer.model, vocab.json) {fix}")):
        load_backbone_config(str(converted))


def test_backbones_with_layers_the_shared_prompt_masks_do_not_cover_are_refused():
    from transformers import Gemma2Config, LlamaConfig

    check_layer_types(Gemma2Config(num_hidden_layers=2))  # sliding and full layers
    check_layer_types(LlamaConfig())  # no layer types: one mask
    config = LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["chunked_attention", "full_attention"]  # Llama-4's kind
    with pytest.raises(UserError, match="has chunked_attention layers, which the update's shared-prompt masks"):
        check_layer_types(config)


def test_lora_targets_missing_from_the_backbone_are_named(backbone):
    model, _ = backbone
    with pytest.raises(UserError, match=r"LoRA targets c_attn are not modules .*q_proj.* — fix --lora_target_modules"):
        add_lora(model, target_modules=("q_proj", "c_attn"))


def test_embedded_smollm2_answers_and_its_folder_reloads():
    folder = resolve_model(DEFAULT_MODEL)  # converts the GGUF on first use, then reuses the folder
    assert "quantization_config" not in json.loads(open(f"{folder}/config.json").read())
    model, tokenizer = load_backbone(DEFAULT_MODEL, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = unpadded(tokenizer, chat_prompt(tokenizer, "What is the capital of France?"))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])
    h = encode(model, prompt, torch.ones_like(prompt))  # SPEC §3: the final norm's output at the last token
    with torch.no_grad():
        last = model(prompt, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(h, last.float(), rtol=1e-4, atol=1e-4)


def test_a_hub_id_that_would_not_load_names_offline_mode_when_it_is_on(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    error = OSError("We couldn't connect to 'https://huggingface.co'")
    for offline, says in ((True, "'org/model' is no local folder, so it was read as a hub id, which is not in the "
                                 "Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading: download it first "
                                 "(hf download org/model), or point paths.py or --model at a complete model folder"),
                          (False, "'org/model' is no local folder, so it was read as a hub id: check the id and the "
                                  "connection, or point paths.py or --model at a complete model folder")):
        monkeypatch.setattr(model, "is_offline_mode", lambda: offline)
        assert str(model.load_failure("org/model", "org/model", error)) == (
            f"cannot load model 'org/model' from 'org/model': {error} — {says}")
