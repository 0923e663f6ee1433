"""Tests of rollouts.py on tiny random Qwen2-, Gemma-2-, Llama-shaped and newer models (CPU, float32).

    python -m pytest -q tests/test_rollouts.py

The engine must give what plain `generate` gives: the same greedy tokens, stops and masks, and
log-probs and user states h equal to a fresh forward pass (h: model.py's `encode` of prompt +
reasoning); its sampler must follow the temperature / top-k / top-p distribution that
`generate`'s own logits warpers define.
"""
import re
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    FalconConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import rollouts
from errors import UserError
from bench.bench_rollout import PAD, random_prompts
from model import attention_implementation, enable_checkpointing, encode, policy_forward, shared_prompt_forward
from prompts import StopRule
from rollouts import (SamplingConfig, check_attention_interface, fresh_forward, generate_rollouts,
                      generate_rollouts_reference)

VOCAB = 320
# initializer_range 0.3 (not 0.02) makes random models write varied text instead of one repeated token
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, pad_token_id=PAD)


def tiny_model(family: str, **overrides):
    torch.manual_seed(0)
    if family == "qwen2":
        config = Qwen2Config(**{**TINY, **overrides}, tie_word_embeddings=True)
    elif family == "gemma2":  # soft-capping on, sliding window shorter than prompt + reasoning
        config = Gemma2Config(**{**TINY, **overrides}, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    elif family == "llama":
        config = LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=False)
    elif family == "qwen3":  # q/k norms, explicit head_dim
        config = Qwen3Config(**{**TINY, **overrides}, head_dim=16)
    elif family == "gemma3":  # sliding and global layers, q/k norms
        config = Gemma3TextConfig(**{**TINY, **overrides}, head_dim=16, query_pre_attn_scalar=16, sliding_window=5)
    elif family == "gpt-oss":  # attention sinks, sliding layers, mixture of experts
        config = GptOssConfig(**{**TINY, **overrides}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                              sliding_window=5)
    elif family == "deepseek-v3":  # multi-head latent attention: key heads of 24, value heads of 12
        config = DeepseekV3Config(**{**TINY, "num_key_value_heads": 4, **overrides}, q_lora_rank=None, kv_lora_rank=32,
                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                                  topk_group=1)
    else:  # "gemma3-vlm": what AutoModelForCausalLM loads for gemma-3-4b and larger, a text config inside
        text = {key: value for key, value in {**TINY, **overrides}.items() if key != "pad_token_id"}
        config = Gemma3Config(text_config=dict(text, head_dim=16, query_pre_attn_scalar=16, sliding_window=5),
                              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14),
                              mm_tokens_per_image=4, pad_token_id=PAD, image_token_index=VOCAB - 3,
                              boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                            attn_implementation=attention_implementation(config)).eval()


def lora_model():
    """Qwen2 with LoRA on every projection, B initialised non-zero so the adapter changes outputs."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(tiny_model("qwen2"), config)


def prompts(lengths=(9, 6, 4), seed=1, vocab=VOCAB):
    """Left-padded batch of prompts of different lengths.  -> ids, mask (B, max(lengths))."""
    return random_prompts(vocab, lengths, "cpu", seed)


NEVER = StopRule.exact([[VOCAB - 1] * 3])  # a stop these models never write: every row is forced


def natural_and_forced_stops(model, ids, mask, max_new_tokens):
    """Stop sequences taken from the model's own greedy text: row 0 ends early on a 2-token stop,
    and a 1-token stop from row 2's text; rows that never meet either are forced."""
    free = generate_rollouts_reference(model, ids, mask, 1, SamplingConfig(max_new_tokens, greedy=True),
                                       NEVER, PAD).completion_ids
    return StopRule.exact([free[0, 3:5].tolist(), [int(free[2, 10])]])


def assert_well_formed(r, stop, max_new_tokens):
    """Every row: a block of mask 1 ending with a stop sequence, then padding with log-prob 0."""
    lengths = r.completion_mask.sum(1)
    assert int(lengths.max()) == r.completion_ids.shape[1] <= max_new_tokens
    for row, n in enumerate(lengths.tolist()):
        assert r.completion_mask[row, :n].all() and not r.completion_mask[row, n:].any()
        tokens = r.completion_ids[row, :n].tolist()
        assert stop.match(tokens) == tokens[-1], tokens
        assert (r.completion_ids[row, n:] == PAD).all() and (r.logprobs[row, n:] == 0).all()


def assert_same_rollouts(ours, ref):
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours.user_states, ref.user_states, atol=1e-4, rtol=0)


def assert_user_states_are_encode(model, r):
    """h of every row = model.py's `encode` of prompt + completion in one fresh forward, eval mode
    (what the trainer's scoring forward computes)."""
    model.eval()  # PEFT builds its LoRA dropouts in training mode
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)  # (N, P + C)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    with torch.no_grad():
        expected = encode(model, ids, mask).float()  # (N, D)
    assert r.user_states.dtype == torch.float32 and r.user_states.shape == expected.shape
    torch.testing.assert_close(r.user_states, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "llama", "qwen2-lora", "qwen3", "gemma3", "gemma3-vlm",
                                    "gpt-oss", "deepseek-v3"])
def test_greedy_equals_generate(family):
    """Also on newer families than the defaults: the engine relies only on the attention interface."""
    model = lora_model() if family == "qwen2-lora" else tiny_model(family)
    ids, mask = prompts()
    T = 24
    stop = natural_and_forced_stops(model, ids, mask, T)
    sampling = SamplingConfig(max_new_tokens=T, greedy=True)
    ref = generate_rollouts_reference(model, ids, mask, 2, sampling, stop, PAD)
    ours = generate_rollouts(model, ids, mask, 2, sampling, stop, PAD)
    assert_same_rollouts(ours, ref)
    assert_well_formed(ours, stop, T)
    assert_user_states_are_encode(model, ours)
    lengths = ours.completion_mask.sum(1)
    assert (lengths < T).any() and (lengths == T).any(), "want both natural and forced stops"


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "llama", "qwen2-lora", "qwen3", "gemma3", "gemma3-vlm",
                                    "gpt-oss", "deepseek-v3"])
def test_a_shared_prompt_forward_equals_one_forward_per_trajectory(family):
    """Two prompts (one left-padded) with 2 and 3 reasonings of different lengths, packed into two
    rows, against `policy_forward` on each [prompt | reasoning] row alone. The training update's
    forward; sliding windows of 5 bind (rows of up to 13 tokens)."""
    model = lora_model().eval() if family == "qwen2-lora" else tiny_model(family)
    vocab, lengths, prompt_of = VOCAB - 3, [6, 2, 4, 1, 5], [0, 0, 1, 1, 1]
    prompt_ids, prompt_mask = torch.randint(5, vocab, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    prompt_ids[1, :3], prompt_mask[1, :3] = 0, 0
    completion_ids, completion_mask = torch.randint(5, vocab, (5, 6)), torch.zeros(5, 6, dtype=torch.long)
    for m, n in enumerate(lengths):
        completion_ids[m, n:], completion_mask[m, :n] = 0, 1
    with torch.no_grad():
        logprobs, h = shared_prompt_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                            prompt_of, temperature=2.0)
        expected_logprobs, expected_h = policy_forward(
            model, torch.cat([prompt_ids[prompt_of], completion_ids], 1),
            torch.cat([prompt_mask[prompt_of], completion_mask], 1), 6, temperature=2.0)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, expected_h, rtol=1e-5, atol=1e-5)
    assert (logprobs != 0).sum(1).tolist() == lengths


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "llama", "qwen2-lora"])
def test_sampled_user_states_equal_encode(family):
    """Sampling, G = 2, left-padded prompts; the stop is a token row 0 writes at step 4 of the same
    draw (same seed), so row 0 stops there, and rows that never write it are forced."""
    model = lora_model() if family == "qwen2-lora" else tiny_model(family)
    ids, mask = prompts()
    T = 16
    sampling = SamplingConfig(T, temperature=1.5, top_k=40)
    torch.manual_seed(5)
    free = generate_rollouts(model, ids, mask, 2, sampling, NEVER, PAD).completion_ids
    stop = StopRule.exact([[int(free[0, 4])]])
    torch.manual_seed(5)
    r = generate_rollouts(model, ids, mask, 2, sampling, stop, PAD)
    assert_well_formed(r, stop, T)
    assert_user_states_are_encode(model, r)
    lengths = r.completion_mask.sum(1)
    assert (lengths < T).any() and (lengths == T).any(), "want both natural and forced stops"


@pytest.mark.parametrize("tempered", [False, True])
def test_sampled_logprobs_equal_a_fresh_forward(tempered):
    model = tiny_model("gemma2")
    ids, mask = prompts((7, 3, 5, 7))
    stop = StopRule.exact([[11, 12], [13]])
    T = 20
    torch.manual_seed(3)
    sampling = SamplingConfig(T, temperature=1.5, top_k=40, tempered_logprobs=tempered)
    r = generate_rollouts(model, ids, mask, 3, sampling, stop, PAD)
    assert_well_formed(r, stop, T)
    assert r.completion_ids.shape[0] == 12 and torch.equal(r.prompt_ids[3 * 2 + 1], ids[2])
    # log-probs of softmax(logits), or of the sampling policy softmax(logits / 1.5); top-k left out
    fresh = {t: fresh_forward(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, t)[0]
             for t in (1.0, 1.5)}
    expected, other = (fresh[1.5], fresh[1.0]) if tempered else (fresh[1.0], fresh[1.5])
    torch.testing.assert_close(r.logprobs, expected, atol=2e-5, rtol=0)
    assert (r.logprobs - other).abs().max() > 1e-2
    assert len(set(map(tuple, r.completion_ids[:3].tolist()))) > 1, "G samples of one prompt should differ"


def test_forced_stop_fills_the_budget():
    model = tiny_model("llama")
    ids, mask = prompts()
    stop = [VOCAB - 1, VOCAB - 2, VOCAB - 1]  # never written by this model: every row is forced
    # T = len(stop): the whole budget is the forced stop; h then comes from the extra step T
    for T, stop in ((1, stop[:1]), (3, stop), (10, stop)):
        r = generate_rollouts(model, ids, mask, 2, SamplingConfig(T, temperature=1.2), StopRule.exact([stop]), PAD)
        assert r.completion_ids.shape == (6, T) and r.completion_mask.all()
        assert (r.completion_ids[:, -len(stop):] == torch.tensor(stop)).all()
        fresh = fresh_forward(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)[0]
        torch.testing.assert_close(r.logprobs, fresh, atol=2e-5, rtol=0)
        assert_user_states_are_encode(model, r)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "llama"])
def test_stop_rule_token_sets_replacement_and_end_of_turn(family):
    """What `answer_stop` relies on, greedy, engine against `generate`: a pattern position
    allows a set of tokens (a BPE merge like '?<' or '>['), the token completing a pattern is
    replaced by the pattern's last id ('>' for '>['), and a row that writes an end of turn
    gets the forced stop in its place. Expected rows: a walk over the free greedy text."""
    model = tiny_model(family)
    ids, mask = prompts()
    T = 24
    free = generate_rollouts_reference(model, ids, mask, 1, SamplingConfig(T + 3, greedy=True), NEVER, PAD)
    rows = [row[:T] for row in free.completion_ids.tolist()]  # before NEVER's forced 3 tokens
    unused = sorted(set(range(VOCAB)) - {t for row in rows for t in row})
    first, second = {unused[0], rows[0][3]}, {unused[1], rows[0][4]}
    end = rows[2][6]
    replacement, forced = unused[2], unused[3:5]
    stop = StopRule(patterns=((frozenset(first), frozenset(second)), (frozenset(forced[:1]), frozenset(forced[1:]))),
                    last_ids=(replacement, forced[1]), forced=tuple(forced), end_ids=frozenset({end}))

    def expected(row):
        for i, token in enumerate(row[:T - len(forced)]):
            if token == end:
                return row[:i] + forced, "end of turn"
            if i > 0 and row[i - 1] in first and token in second:
                return row[:i] + [replacement], "pattern"
        return row[:T - len(forced)] + forced, "budget"

    sampling = SamplingConfig(max_new_tokens=T, greedy=True)
    ours = generate_rollouts(model, ids, mask, 1, sampling, stop, PAD)
    assert_same_rollouts(ours, generate_rollouts_reference(model, ids, mask, 1, sampling, stop, PAD))
    assert_user_states_are_encode(model, ours)
    lengths = ours.completion_mask.sum(1).tolist()
    assert [ours.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)] == [expected(r)[0] for r in rows]
    assert {"pattern", "end of turn"} <= {expected(r)[1] for r in rows}, "want both kinds of stop"


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tiny gemma2's greedy text repeats one token
def test_a_row_stopped_inside_the_forced_stop_gets_only_its_rest(family):
    """A row whose last tokens already begin the forced stop (its first one or two positions,
    each a set of tokens as in `answer_stop`) when its budget runs out or its turn ends gets the
    rest of it: `<answer>`, not `<<answer>`. Greedy, engine against `generate`; expected rows
    written out from the free greedy text."""
    model = tiny_model(family)
    ids, mask = prompts()
    T, F = 24, 3
    free = generate_rollouts_reference(model, ids, mask, 1, SamplingConfig(T + 3, greedy=True), NEVER, PAD)
    rows = [row[:T - F] for row in free.completion_ids.tolist()]  # what each row writes before its forced stop
    cut = next(i for i, t in enumerate(rows[2]) if i >= 2 and t not in rows[2][:i] + rows[0] + rows[1])
    end = rows[2][cut]  # row 2's turn ends there, rows 0 and 1 run out of budget
    unused = sorted(set(range(VOCAB)) - {t for row in rows for t in row})
    forced = unused[:F]
    first = {forced[0], rows[0][-1], rows[1][-2], rows[2][cut - 1]}  # row 0, 2: one written; row 1: two
    second = {forced[1], rows[1][-1]}
    stop = StopRule(patterns=((frozenset(first), frozenset(second), frozenset(forced[2:])),),
                    last_ids=(forced[2],), forced=tuple(forced), end_ids=frozenset({end}))

    def written(tokens):  # how many first positions of the forced stop the tokens end with
        return max([k for k, heads in ((1, [first]), (2, [first, second])) if [t in h for t, h in
                    zip(tokens[-k:], heads)] == [True] * k], default=0)

    before_forced = [row[:row.index(end)] if end in row else row for row in rows]
    assert [written(row) for row in before_forced[:3]] == [1, 2, 1]
    expected = [row + forced[written(row):] for row in before_forced]
    sampling = SamplingConfig(max_new_tokens=T, greedy=True)
    ours = generate_rollouts(model, ids, mask, 1, sampling, stop, PAD)
    assert_same_rollouts(ours, generate_rollouts_reference(model, ids, mask, 1, sampling, stop, PAD))
    assert_user_states_are_encode(model, ours)
    lengths = ours.completion_mask.sum(1).tolist()
    assert [ours.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)] == expected
    assert expected[:3] == [rows[0] + forced[1:], rows[1] + forced[2:], rows[2][:cut] + forced[1:]]


def test_a_forced_stop_longer_than_every_pattern_is_looked_back_at_whole():
    """The engine keeps enough past tokens to find a forced stop's first F - 1 tokens even when
    every pattern is shorter: row 1 wrote forced[:2] when its budget ran out, and gets forced[2]."""
    model = tiny_model("qwen2")
    ids, mask = prompts()
    T, F = 24, 3
    free = generate_rollouts_reference(model, ids, mask, 1, SamplingConfig(T + 3, greedy=True), NEVER, PAD)
    rows = [row[:T - F] for row in free.completion_ids.tolist()]
    unused = sorted(set(range(VOCAB)) - {t for row in rows for t in row})
    forced = (rows[1][-2], rows[1][-1], unused[0])
    stop = StopRule(patterns=((frozenset(forced[1:2]), frozenset(forced[2:])),), last_ids=(forced[2],), forced=forced)
    assert [stop.written_prefix(row) for row in rows] == [0, 2, 0]
    sampling = SamplingConfig(max_new_tokens=T, greedy=True)
    ours = generate_rollouts(model, ids, mask, 1, sampling, stop, PAD)
    assert_same_rollouts(ours, generate_rollouts_reference(model, ids, mask, 1, sampling, stop, PAD))
    lengths = ours.completion_mask.sum(1).tolist()
    assert [ours.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)] == [
        rows[0] + list(forced), rows[1] + [forced[2]], rows[2] + list(forced)]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.5, 5, 1.0), (0.7, 0, 0.8), (1.0, 8, 0.9)])
def test_sampling_follows_the_filtered_distribution(temperature, top_k, top_p):
    """First token of 8000 samples of one prompt against generate's warpers, chi-square."""
    model = tiny_model("qwen2", vocab_size=24)
    ids, mask = prompts((5,), vocab=24)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1]  # (1, V)
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None):
        logits = warper(ids, logits) if warper else logits
    expected = logits.softmax(-1)[0].double()  # (V,)
    torch.manual_seed(7)
    n = 8000
    sampling = SamplingConfig(max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p)
    first = generate_rollouts(model, ids, mask, n, sampling, StopRule.exact([[23]]), PAD).completion_ids[:, 0]
    counts = torch.bincount(first, minlength=24).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "a filtered-out token was sampled"
    assert 2 <= support.sum() < 24 or top_k == 0 and top_p == 1, "the filter should bite"
    chi2 = ((counts - n * expected)[support] ** 2 / (n * expected[support])).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi2 {chi2:.1f} with {dof} degrees of freedom"


def test_the_generate_reference_ignores_the_model_s_own_generation_settings():
    """A backbone's generation_config (Qwen2.5-Instruct's: eos ids, repetition_penalty 1.05) must not
    stop or bend the reference's decoding: the stop rule alone decides, as in the engine."""
    model = tiny_model("llama")
    ids, mask = prompts()
    sampling = SamplingConfig(max_new_tokens=12, greedy=True)
    ours = generate_rollouts(model, ids, mask, 1, sampling, NEVER, PAD)
    model.generation_config.eos_token_id = int(ours.completion_ids[0, 4])  # written mid-row
    model.generation_config.repetition_penalty = 1.3
    assert_same_rollouts(ours, generate_rollouts_reference(model, ids, mask, 1, sampling, NEVER, PAD))
    assert model.generation_config.repetition_penalty == 1.3  # the model's own settings are left as they were


def test_model_state_is_restored_and_outputs_feed_autograd():
    model = lora_model()
    model.train()
    model.get_base_model().lm_head.eval()  # a module deliberately left in eval mode stays so
    enable_checkpointing(model)
    before = [m.training for m in model.modules()]
    ids, mask = prompts()
    r = generate_rollouts(model, ids, mask, 2, SamplingConfig(8), StopRule.exact([[5]]), PAD)
    assert [m.training for m in model.modules()] == before
    assert model.config._attn_implementation == "sdpa"
    assert not model.get_decoder()._forward_hooks, "the user-state hook must be removed"
    assert not any(torch.is_inference(t) or t.requires_grad for t in r)
    out = model(input_ids=torch.cat([r.prompt_ids, r.completion_ids], 1)).logits
    out.float().mean().backward()  # ids from the engine work in a training forward


def test_returned_tensors_are_not_overwritten_by_the_next_call():
    """The decode buffers are reused by the next call of the same shape: what a call returns are
    copies, also the mask when it keeps the buffer's dtype (a bool prompt mask)."""
    model = tiny_model("qwen2")
    rollouts.clear_rollout_cache(model)
    ids, mask = prompts()
    r = generate_rollouts(model, ids, mask.bool(), 2, SamplingConfig(max_new_tokens=8), StopRule.exact([[7]]), PAD)
    kept = [t.clone() for t in r]
    (state,) = rollouts._STATES[model].values()
    for buffer in vars(state).values():  # as the next call's writes would
        if isinstance(buffer, torch.Tensor):
            buffer.fill_(float("nan") if buffer.is_floating_point() else 0)
    for returned, copy in zip(r, kept):
        assert torch.equal(returned, copy)


def test_lm_head_reads_contiguous_rows():
    """The prefill keeps only the last position, as a contiguous copy (a strided view makes
    PyTorch's CPU matmul copy the LM head once per row); decoding feeds one position."""
    model = tiny_model("llama")
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((out.shape[1], args[0].is_contiguous()))
    )
    ids, mask = prompts()
    generate_rollouts(model, ids, mask, 2, SamplingConfig(max_new_tokens=4, greedy=True), StopRule.exact([[7]]), PAD)
    hook.remove()
    assert seen and set(seen) == {(1, True)}


def test_one_state_serves_other_prompt_lengths():
    """Shorter prompts reuse the first call's buffers (and CUDA graph); a prompt past the prefix
    capacity replaces them with at least twice the capacity."""
    model = tiny_model("qwen2")
    rollouts.clear_rollout_cache(model)
    sampling = SamplingConfig(max_new_tokens=12, greedy=True)
    for lengths, capacity in (((9, 6, 4), 128), ((3, 5, 2), 128), ((140, 20, 7), 256)):
        ids, mask = prompts(lengths, seed=sum(lengths))
        ref = generate_rollouts_reference(model, ids, mask, 2, sampling, StopRule.exact([[7]]), PAD)
        assert_same_rollouts(generate_rollouts(model, ids, mask, 2, sampling, StopRule.exact([[7]]), PAD), ref)
        (state,) = rollouts._STATES[model].values()
        assert state.Pcap == capacity


def test_cached_states_follow_the_weights_and_keep_the_four_latest_shapes():
    """An optimizer step (in place) reuses the state and is read live; weights loaded anew (new
    tensors) drop it. Of five shapes the four used last are kept, the oldest dropped first."""
    model = tiny_model("qwen2")
    rollouts.clear_rollout_cache(model)
    sampling, stop = SamplingConfig(max_new_tokens=10, greedy=True), StopRule.exact([[7]])
    ids, mask = prompts()

    def rollout_matches_generate():
        ours = generate_rollouts(model, ids, mask, 2, sampling, stop, PAD)
        assert_same_rollouts(ours, generate_rollouts_reference(model, ids, mask, 2, sampling, stop, PAD))
        (state,) = rollouts._STATES[model].values()
        return ours.completion_ids, state

    first, state = rollout_matches_generate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stepped, stepped_state = rollout_matches_generate()
    assert stepped_state is state and not torch.equal(stepped, first)
    model.load_state_dict({name: 1.1 * p for name, p in model.state_dict().items()}, assign=True)
    reloaded, reloaded_state = rollout_matches_generate()
    assert reloaded_state is not state and not torch.equal(reloaded, stepped)
    for num_prompts in (1, 2, 3, 2, 4):  # 3 prompts (the call above) then 1, 2, 3, 2 again, 4
        short_ids, short_mask = prompts((9, 6, 4, 5)[:num_prompts])
        generate_rollouts(model, short_ids, short_mask, 2, sampling, stop, PAD)
    assert [key[0] for key in rollouts._STATES[model]] == [1, 3, 2, 4]


def test_autocast_gets_its_own_state():
    """A bf16-autocast call between two plain ones: each gets the buffers (and graph) of its own
    precision, so the plain calls agree and the autocast one equals an autocast call on a fresh
    cache (it used to crash, writing bf16 keys into the float32 buffers of the first call)."""
    model = tiny_model("qwen2")
    rollouts.clear_rollout_cache(model)
    sampling, stop = SamplingConfig(max_new_tokens=10, greedy=True), StopRule.exact([[7]])
    ids, mask = prompts()
    rollout = lambda: generate_rollouts(model, ids, mask, 2, sampling, stop, PAD)
    plain = rollout()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = rollout()
        rollouts.clear_rollout_cache(model)
        autocast_fresh = rollout()
    assert_same_rollouts(rollout(), plain)
    assert_same_rollouts(autocast, autocast_fresh)
    assert sorted(str(key[7]) for key in rollouts._STATES[model]) == ["None", "torch.bfloat16"]  # autocast


def test_an_enclosing_autocast_region_s_cast_cache_is_not_used():
    """Inside one autocast region, LoRA weights updated in place between two calls (an optimizer
    step) reach the second call: its casts are not the region's cached copies from the first call
    (on a GPU a captured graph would replay reads of those copies, freed when the region ends)."""
    model = lora_model()
    rollouts.clear_rollout_cache(model)
    sampling, stop = SamplingConfig(max_new_tokens=10, greedy=True), StopRule.exact([[7]])
    ids, mask = prompts()
    rollout = lambda: generate_rollouts(model, ids, mask, 1, sampling, stop, PAD)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = rollout()
        with torch.no_grad():
            for p in lora_b:
                p.mul_(-3.0)
        after = rollout()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a region of its own: nothing cached yet
        assert_same_rollouts(after, rollout())
    assert not torch.equal(after.logprobs, before.logprobs)


def test_disabled_or_merged_adapters_get_their_own_state():
    """A captured graph replays the adapter branches it recorded: `disable_adapter()` (a reference
    policy) and a merge must not reuse the state of the plain adapter."""
    model = lora_model()
    rollouts.clear_rollout_cache(model)
    sampling, stop = SamplingConfig(max_new_tokens=10, greedy=True), StopRule.exact([[7]])
    ids, mask = prompts()
    rollout = lambda: generate_rollouts(model, ids, mask, 1, sampling, stop, PAD)
    with_adapter = rollout()
    with model.disable_adapter():
        without = rollout()
    model.merge_adapter()
    merged = rollout()
    model.unmerge_adapter()
    assert len(rollouts._STATES[model]) == 3
    assert_same_rollouts(rollout(), with_adapter)
    torch.testing.assert_close(merged.logprobs, with_adapter.logprobs, atol=1e-4, rtol=0)
    base = tiny_model("qwen2")
    assert_same_rollouts(without, generate_rollouts(base, ids, mask, 1, sampling, stop, PAD))


def test_a_step_that_cannot_be_captured_decodes_without_a_graph(monkeypatch):
    """A capture that fails (an operation capture forbids) warns once and the model decodes
    eagerly from then on, with the same rollouts; running out of memory in the capture propagates."""
    model = tiny_model("qwen2")
    rollouts.clear_rollout_cache(model)
    sampling, stop = SamplingConfig(max_new_tokens=10, greedy=True), StopRule.exact([[7]])
    ids, mask = prompts()
    eager = generate_rollouts(model, ids, mask, 2, sampling, stop, PAD)
    rollouts.clear_rollout_cache(model)
    attempts = []

    def failing_capture(model, st):  # as torch.cuda.graph fails: capture_end raises on the way out
        attempts.append(1)
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(rollouts, "replays_graphs", lambda device: True)
    monkeypatch.setattr(rollouts, "_warm_up", lambda model, st: None)
    monkeypatch.setattr(rollouts, "_record_graph", failing_capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = (generate_rollouts(model, ids, mask, 2, sampling, stop, PAD) for _ in range(2))
        generate_rollouts(model, ids, mask, 1, sampling, stop, PAD)  # another shape
    assert_same_rollouts(first, eager)
    assert_same_rollouts(second, eager)
    assert attempts == [1]  # the model is remembered: no second attempt, no second warning
    assert [str(w.message) for w in caught] == [
        "the decode step of Qwen2ForCausalLM cannot be captured as a CUDA graph (CUDA error: operation not "
        "permitted when stream is capturing): decoding without one, slower"]

    def out_of_memory(model, st):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def out_of_memory_then_capture_end_fails(model, st):
        try:
            out_of_memory(model, st)
        finally:
            raise RuntimeError("operation failed due to a previous error during capture")

    for capture in (out_of_memory, out_of_memory_then_capture_end_fails):
        rollouts.clear_rollout_cache(model)
        monkeypatch.setattr(rollouts, "_record_graph", capture)
        with pytest.raises(torch.OutOfMemoryError):
            generate_rollouts(model, ids, mask, 2, sampling, stop, PAD)


def test_bad_inputs_are_refused():
    model = tiny_model("qwen2")
    ids, mask = prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate_rollouts(model, ids, mask.flip(1), 2, SamplingConfig(8), StopRule.exact([[5]]), PAD)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_rollouts(model, ids[:0], mask[:0], 2, SamplingConfig(8), StopRule.exact([[5]]), PAD)
    with pytest.raises(ValueError, match="raise max_new_tokens"):
        generate_rollouts(model, ids, mask, 2, SamplingConfig(2), StopRule.exact([[5, 6, 7]]), PAD)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(8, top_p=0.0)


def test_a_backbone_without_the_attention_interface_is_refused():
    """Falcon's attention is its own code: under the engine it crashed with a TypeError deep inside."""
    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=True, num_kv_heads=2, pad_token_id=PAD)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = prompts()
    with pytest.raises(UserError, match=re.escape("FalconForCausalLM: its attention does not go through "
                                                  "transformers' AttentionInterface, which the rollout engine runs on")):
        generate_rollouts(model, ids, mask, 2, SamplingConfig(8), StopRule.exact([[5]]), PAD)
    check_attention_interface(tiny_model("gpt-oss"))  # sinks, sliding layers and experts: through the interface
    check_attention_interface(AutoModelForCausalLM.from_config(StableLmConfig(**TINY)))  # no class flag, but it does


def test_a_layer_that_bypasses_the_attention_interface_is_refused():
    """The engine's decode steps read the prompt's keys from what the prefill stored through the
    attention interface; a layer with attention of its own would leave them empty, silently."""
    model = tiny_model("qwen2")
    model.model.layers[1].self_attn.forward = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None)
    ids, mask = prompts()
    with pytest.raises(UserError, match="only 1 of the backbone's 2 attention layers ran through the rollout engine"):
        generate_rollouts(model, ids, mask, 2, SamplingConfig(8), StopRule.exact([[5]]), PAD)
    assert model.config._attn_implementation == "sdpa"
