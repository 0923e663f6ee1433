"""Reasoning rollouts for RecPO training and greedy evaluation (SPEC §4.1, §5).

This file owns the rollout interface the trainer calls, `generate_rollouts`, its typed output
`Rollouts` (the reasonings, their log-probs and each row's user state h), the `SamplingConfig`
(how a token is chosen; `prompts.StopRule` says when a row ends), and
`generate_rollouts_reference`, the same contract through plain Hugging Face `generate`, kept
for the tests and the benchmark. Nothing runs it directly:
    python -m pytest -q tests/test_rollouts.py          # correctness, CPU
    python bench/bench_rollout.py                        # speed against `generate`, GPU

How `generate_rollouts` works. Each distinct prompt is prefilled once; its keys and values are
shared by its G samples instead of being copied G times. Decoding then runs one token per step
for all N = B·G rows over preallocated buffers, so on a GPU the whole step (model forward,
sampling, the stop test) is captured once as a CUDA graph and replayed:

    prompts (B, P) ──prefill once──▶ prefix K/V per layer   (B, kvh, Pcap, d)  right-aligned
                                     decode K/V per layer   (N, kvh, T, d)     slot t = token t
    step t:  token t-1 (N, 1) ──model──▶ every attention layer scores row i·G+j against
             [ prefix of prompt i | its own slots 0..t-1 ]  under one softmax
             ──▶ logits (N, V) ──▶ filter, sample, force, stop test on the device ──▶ token t
             └─ decoder output (N, D) ──▶ user_states[i] where token t-1 is row i's last token

The user state h of a row (SPEC §3: the decoder's final normalised hidden state at the last
token, `encode` (model.py) of prompt + reasoning) comes out of the decoding itself: a forward hook on
the decoder keeps, for each row, the hidden state of the step that feeds the row's final stop
token, so the trainer needs no second forward over prompt + reasoning to score users. That
token still has to be fed once after it is chosen, so decoding runs until every row's final
token has been fed: one step past the last stop (step T feeds token T-1 when a row ends there).

The model is any Hugging Face causal LM (PEFT LoRA wrapped or not): during a call its config's
attention implementation is switched to `r2ec_rollout`, registered below in transformers'
`AttentionInterface`, so the model's own projections, rotary embedding, norms and LoRA run
unchanged and only the attention itself reads our buffers (soft-capping, sliding windows,
attention sinks and key heads wider than value heads included: Gemma-2, gpt-oss, DeepSeek-V3).
Masks are never built by transformers during a call (the name has no mask function, so its mask
builder returns None). A model whose attention bypasses the interface is refused.

Limits, by choice: rows that have stopped keep computing (padding) until every row of the call
has stopped and fed its last token, checked on the host every CHECK_EVERY steps, since compacting
the batch would need a graph per batch size; the decode slots are read in full every step
(masked), the price of one static graph; LoRA layers run unmerged, as PEFT runs them (a merged
bf16 copy of W + ΔW rounds away the small updates RL makes: tried, the quick start's trained
valid NDCG@10 fell from 0.166 to 0.112). `compile_step=True` fuses the step's small kernels
with `torch.compile` before capture: 1.7x faster decoding, about 75 s of compilation per new
shape. A step that cannot be captured (a host sync inside, as some mixture-of-experts routing
has) runs without the graph, with a warning. Figures: bench/RESULTS.md, "Rollouts".
"""
import math
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AttentionInterface, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from errors import UserError, one_line
from model import (decoder_configs, decoder_hook, eval_mode, in_sliding_window, last_positions, mask_positions,
                   policy_forward)
from prompts import StopRule

ATTENTION_NAME = "r2ec_rollout"
PREFIX_BUCKET = 128  # prefix capacity grows in these steps, so varying prompt lengths reuse one graph
MAX_CACHED_SHAPES = 4  # decode states kept per model: training, evaluation (whole batches), and room for others
CHECK_EVERY = 8  # decode steps between host checks of "every row has stopped"
NEG = -1e30  # additive mask; finite so a fully masked score never turns into NaN


# ----------------------------------------------------------------------------------------------
# Interface


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Frozen: it keys the captured decode graphs."""

    max_new_tokens: int  # reasoning tokens at most, the forced stop sequence included
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False  # argmax (evaluation); temperature, top-k and top-p are then ignored
    tempered_logprobs: bool = False  # log-probs of softmax(logits / temperature) instead of softmax(logits)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (use greedy=True for argmax)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 turns top-k off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 turns top-p off)")

    @property
    def policy_temperature(self) -> float:
        """T of the policy softmax(logits / T) whose log-probs a rollout returns.

        1 by default; the sampling temperature with `tempered_logprobs` (TRL's GRPO convention:
        the log-probs of the policy that sampled). Top-k and top-p are left out either way.
        """
        return self.temperature if self.tempered_logprobs and not self.greedy else 1.0


class Rollouts(NamedTuple):
    prompt_ids: torch.Tensor  # (N, P) left-padded; N = num_prompts·G, sample j of prompt i at row i·G + j
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded with pad_token_id; every row ends with a stop sequence
    completion_mask: torch.Tensor  # (N, C) 1 on the reasoning tokens, the stop tokens included
    # (N, C) float32 log π(token), π = softmax(logits / policy_temperature); 0 off the mask. The trainer
    # takes π_old from its own forward instead (see RecPOTrainer.token_loss) and logs the gap to these.
    logprobs: torch.Tensor
    user_states: torch.Tensor  # (N, D) float32, h at each row's last token (= `encode` in model.py)


def _check_inputs(prompt_ids, prompt_mask, num_samples, sampling, stop: StopRule):
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape or 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                         "must both be (num_prompts, P), with at least one prompt of at least one token")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (prompt_mask[:, -1] all 1): tokenize with padding_side='left'")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be at least 1")
    if not stop.forced or stop.match(list(stop.forced)) != stop.forced[-1]:
        raise ValueError(f"stop.forced={stop.forced!r} must be a non-empty sequence that ends a pattern of the rule")
    if sampling.max_new_tokens < len(stop.forced):
        raise ValueError(f"max_new_tokens={sampling.max_new_tokens} cannot hold the stop sequence "
                         f"({len(stop.forced)} tokens): raise max_new_tokens")


def _base_model(model):
    """The transformers model under a PEFT wrapper (its config drives the attention dispatch)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_attention_interface(model):
    """The engine runs attention through transformers' AttentionInterface: a model whose attention
    does not (Falcon, Bloom) would crash in it. transformers' own test reads the modelling code;
    hybrids that pass it (LFM2) are caught by `_prefill`'s count of layers."""
    model_class = type(_base_model(model))
    if not getattr(model_class, "_can_set_attn_implementation", lambda: True)():
        raise UserError(attention_interface_error(model_class.__name__))


def attention_interface_error(what: str) -> str:
    return (f"{what}: its attention does not go through transformers' AttentionInterface, which the rollout "
            "engine runs on — pick a backbone that does (Gemma-2, Qwen2.5, Llama and most current models)")


@contextmanager
def _generation_mode(model, attn_implementation: str | None = None):
    """`eval_mode` for the call, with the decoder's attention switched to `attn_implementation`."""
    configs = decoder_configs(_base_model(model).config)
    previous = [c._attn_implementation for c in configs]
    if attn_implementation is not None:
        for c in configs:
            c._attn_implementation = attn_implementation
    try:
        with eval_mode(model):
            yield
    finally:
        for c, implementation in zip(configs, previous):
            c._attn_implementation = implementation


# ----------------------------------------------------------------------------------------------
# Sampling on the device


def _sample_tokens(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """SPEC §4.1 sampling: next token per row, no host round trip.  logits (N, V) float32 -> (N,) long.

    Order as in `generate`: temperature, then top-k, then top-p on the temperature-scaled
    logits. The draw is the exponential race argmax(p / E), E ~ Exp(1), which picks token i
    with probability p_i / sum(p) without normalising p or calling `multinomial` (whose input
    checks can synchronise the host).
    """
    if sampling.greedy:
        return logits.argmax(-1)
    # Filtering raw logits and scaling only what survives reads the (N, V) logits once less;
    # dividing by a positive temperature keeps the order, so top-k and the sort are unchanged.
    if sampling.top_k > 0:  # sorted top-k values: top-p then only needs these k
        values, index = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1)  # (N, k)
    elif sampling.top_p < 1:
        values, index = logits.sort(dim=-1, descending=True)  # (N, V)
    else:
        values, index = logits, None
    probs = (values / sampling.temperature).softmax(-1)  # (N, k or V)
    if sampling.top_p < 1:  # keep a token while the mass strictly before it is below top_p
        probs = probs * ((probs.cumsum(-1) - probs) < sampling.top_p)
    race = torch.empty_like(probs).exponential_().clamp_min_(1e-20)  # a zero draw would give 0/0
    choice = (probs / race).argmax(-1)  # (N,)
    return choice if index is None else index.gather(1, choice[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Decode state: every tensor a step reads or writes, allocated once per shape


class _DecodeState:
    """Buffers for B prompts × G samples, prompts up to `prefix_capacity`, `T` new tokens.

    One object serves every call with the same shape key, so a CUDA graph captured over it is
    replayed across calls: a call only rewrites the buffers' contents, never their addresses.
    Per-layer key/value buffers are allocated by the first prefill, which knows their shapes.
    """

    def __init__(self, num_prompts, num_samples, prefix_capacity, sampling, stop, pad_token_id, vocab_size, device,
                 weights, step_fn):
        B, G, T = num_prompts, num_samples, sampling.max_new_tokens
        N, Pcap = B * G, prefix_capacity
        self.B, self.G, self.N, self.T, self.Pcap = B, G, N, T, Pcap
        self.sampling, self.pad_token_id = sampling, pad_token_id
        self.mode = "prefill"  # "prefill" or "decode": which attention `_rollout_attention` runs
        self.weights = weights  # the parameters' addresses when the state was built (see `_state_for`)
        self.step_fn = step_fn  # `_decode_step`, compiled or not
        # Key/value buffers per layer index, written by the model's attention layers
        self.prefix_k, self.prefix_v = {}, {}  # (B, kvh, Pcap, dk) and (B, kvh, Pcap, dv), prompts right-aligned
        self.decode_k, self.decode_v = {}, {}  # (N, kvh, T, dk) and (N, kvh, T, dv)
        self.prompt_mask = None  # (B, P) during a prefill
        self.prefill_masks = {}  # sliding window (None = full) -> (B, 1, P, P) bool, one prefill only
        self.windows = set()  # sliding windows met in the model's layers
        self.user_states = None  # (N, D) float32, allocated by the first prefill (which knows D)
        # Per-row facts of the call
        self.prefix_bias = torch.full((N, Pcap), NEG, device=device)  # 0 on prompt tokens
        self.prefix_positions = torch.zeros(N, Pcap, dtype=torch.long, device=device)
        self.prompt_len = torch.zeros(N, 1, dtype=torch.long, device=device)  # = position of token 0
        # Step state
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # index of the token to choose next
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # decode slot the fed token writes
        self.tokens = torch.zeros(N, 1, dtype=torch.long, device=device)  # last chosen token
        self.positions = torch.zeros(N, 1, dtype=torch.long, device=device)
        self.slots = torch.arange(T, device=device)  # (T,)
        self.bias = {}  # sliding window (None = full) -> (N, 1, 1, Pcap + T) additive mask of the step
        # Outputs. T + 1 columns: step T only feeds token T-1 (for h); the token it chooses,
        # always padding since every row has stopped by then, lands in column T, never returned.
        self.completion = torch.full((N, T + 1), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(N, T + 1, device=device)
        self.completion_mask = torch.zeros(N, T + 1, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(N, dtype=torch.bool, device=device)
        self.stopped_now = torch.zeros(N, dtype=torch.bool, device=device)  # last chosen token ends the row
        # Stop test (StopRule): pattern p matches when allowed[p, j, window[j]] for every j of
        # the window of the last L tokens; shorter patterns are padded with all-True positions on
        # the left, and the extra column V stands for "no token yet".
        L = max(len(stop.forced), *map(len, stop.patterns))  # the forced stop's first tokens are looked back at too
        allowed = torch.ones(len(stop.patterns), L, vocab_size + 1, dtype=torch.bool)
        for p, pattern in enumerate(stop.patterns):
            for j, ids in enumerate(pattern, L - len(pattern)):
                allowed[p, j] = False
                allowed[p, j, sorted(ids)] = True
        self.stop_allowed = allowed.to(device)  # (P, L, V + 1)
        self.stop_last = torch.tensor(stop.last_ids, device=device)  # (P,)
        self.window_index = torch.arange(L, device=device)[None]  # (1, L)
        self.no_token = vocab_size
        self.recent = torch.full((N, L - 1), self.no_token, dtype=torch.long, device=device)  # tokens before this one
        self.is_end = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,) tokens that end a turn
        self.is_end[sorted(i for i in stop.end_ids if i < vocab_size)] = True
        self.forced_ids = torch.tensor(stop.forced, device=device)  # (F,)
        heads = torch.zeros(len(stop.forced) - 1, vocab_size + 1, dtype=torch.bool)  # StopRule.forced_heads
        for j, ids in enumerate(stop.forced_heads()):
            heads[j, sorted(ids)] = True
        self.forced_heads = heads.to(device)  # (F - 1, V + 1)
        self.head_index = torch.arange(len(heads), device=device)  # (F - 1,)
        self.force_from = T - len(self.forced_ids)  # first step at which unstopped rows are forced
        # each row's first forced step: force_from, or the step at which it wrote an end of turn
        self.force_start = torch.full((N,), self.force_from, dtype=torch.long, device=device)
        self.graph = None  # the captured decode step (CUDA only)

    def start(self, prompt_mask: torch.Tensor, positions: torch.Tensor):
        """Load a new call's prompts (before its prefill).  prompt_mask, positions (B, P)."""
        off = self.Pcap - prompt_mask.shape[1]
        rows = lambda x: x.repeat_interleave(self.G, 0)  # (B, ...) -> (N, ...)
        self.prefix_bias.fill_(NEG)
        self.prefix_bias[:, off:] = rows(torch.where(prompt_mask.bool(), 0.0, NEG))
        self.prefix_positions[:, off:] = rows(positions)
        self.prompt_len.copy_(rows(prompt_mask.sum(1, keepdim=True)))
        self.prompt_mask = prompt_mask  # read by the prefill attention to build its masks
        self.prefill_masks.clear()
        self.mode = "prefill"
        self.reset_outputs()

    def reset_outputs(self):
        """Empty the outputs and the stop test (a new call, or after the capture's warm-up)."""
        self.step.zero_()
        self.completion.fill_(self.pad_token_id)
        self.logprobs.zero_()
        self.completion_mask.zero_()
        self.stopped.zero_()
        self.stopped_now.zero_()
        self.recent.fill_(self.no_token)
        self.force_start.fill_(self.force_from)
        if self.user_states is not None:
            self.user_states.zero_()


# ----------------------------------------------------------------------------------------------
# The attention function transformers calls in every layer during a rollout

_ACTIVE: _DecodeState | None = None  # the state of the call in progress


def _prefill_mask(prompt_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal, padding and sliding-window mask of a prompt batch.  (B, P) -> (B, 1, P, P) bool.

    Padding queries may attend to themselves, so no row is fully masked (that would give NaN
    hidden states at padding, which would then poison every row through 0 · NaN).
    """
    P = prompt_mask.shape[1]
    i = torch.arange(P, device=prompt_mask.device)
    allowed = i[None, :] <= i[:, None]  # (P, P) causal: key j <= query i
    if window is not None:
        allowed &= in_sliding_window(i[:, None], i[None, :], window)
    allowed = allowed[None] & prompt_mask.bool()[:, None, :]  # (B, P, P)
    return (allowed | torch.eye(P, dtype=torch.bool, device=prompt_mask.device))[:, None]


def _expand_heads(x: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, kvh, S, d) -> (B, kvh·rep, S, d): head h reads key/value head h // rep, as repeat_kv."""
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def _with_sink(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Attention sinks (gpt-oss): one more logit per head in the softmax, of a zero value.
    scores (..., S) float, sink broadcastable to (..., 1) -> (..., S + 1), the sink last."""
    if sink is None:
        return scores
    return torch.cat([scores, sink.float().expand(*scores.shape[:-1], 1)], -1)


def _prefill_attention(st, layer, query, key, value, scaling, softcap, window, sinks):
    """Plain causal attention over the prompts; stores this layer's keys and values.

    query (B, H, P, dk), key (B, kvh, P, dk), value (B, kvh, P, dv) -> (B, P, H, dv)
    (dk = dv but for multi-head latent attention, DeepSeek-V3's).
    """
    B, kvh, P, dk = key.shape
    dv = value.shape[-1]
    if layer not in st.prefix_k:
        st.prefix_k[layer] = key.new_zeros(B, kvh, st.Pcap, dk)  # zeros: masked slots stay finite
        st.prefix_v[layer] = value.new_zeros(B, kvh, st.Pcap, dv)
        st.decode_k[layer] = key.new_zeros(st.N, kvh, st.T, dk)
        st.decode_v[layer] = value.new_zeros(st.N, kvh, st.T, dv)
    st.prefix_k[layer][:, :, st.Pcap - P:] = key
    st.prefix_v[layer][:, :, st.Pcap - P:] = value
    if window is not None:
        st.windows.add(window)
    if window not in st.prefill_masks:
        st.prefill_masks[window] = _prefill_mask(st.prompt_mask, window)
    mask = st.prefill_masks[window]  # (B, 1, P, P)
    rep = query.shape[1] // kvh
    key, value = _expand_heads(key, rep), _expand_heads(value, rep)
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:  # SDPA has neither soft-capping (Gemma-2) nor sinks (gpt-oss): the eager formula
        scores = (query @ key.transpose(-1, -2)).float() * scaling  # (B, H, P, P)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = _with_sink(scores.masked_fill(~mask, NEG), None if sinks is None else sinks.reshape(1, -1, 1, 1))
        out = scores.softmax(-1)[..., :P].to(value.dtype) @ value
    return out.transpose(1, 2)  # (B, P, H, dv)


def _decode_attention(st, layer, query, key, value, scaling, softcap, window, sinks):
    """One new token per row against [its prompt's shared prefix | its own decode slots].

    query (N, H, 1, dk), key (N, kvh, 1, dk), value (N, kvh, 1, dv) -> (N, 1, H, dv)

    The G rows of a prompt are folded into the query dimension of the prefix product, so the
    prefix is read once per prompt, not once per sample; both score blocks share one softmax
    (concatenated, instead of two softmaxes merged by log-sum-exp: fewer kernels, same result).
    """
    B, G, N, Pcap = st.B, st.G, st.N, st.Pcap
    kvh, dk, dv = key.shape[1], key.shape[-1], value.shape[-1]
    rep = query.shape[1] // kvh
    st.decode_k[layer].index_copy_(2, st.slot, key)
    st.decode_v[layer].index_copy_(2, st.slot, value)
    q = query.reshape(B, G, kvh, rep, dk).transpose(1, 2).reshape(B, kvh, G * rep, dk)
    s_prefix = q @ st.prefix_k[layer].transpose(-1, -2)  # (B, kvh, G·rep, Pcap)
    s_prefix = s_prefix.reshape(B, kvh, G, rep, Pcap).transpose(1, 2).reshape(N, kvh, rep, Pcap)
    s_decode = query.reshape(N, kvh, rep, dk) @ st.decode_k[layer].transpose(-1, -2)  # (N, kvh, rep, T)
    scores = torch.cat([s_prefix, s_decode], -1).float() * scaling  # (N, kvh, rep, Pcap + T)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _with_sink(scores + st.bias[window], None if sinks is None else sinks.reshape(1, kvh, rep, 1))
    probs = scores.softmax(-1).to(value.dtype)  # (N, kvh, rep, Pcap + T [+ 1])
    p_prefix = probs[..., :Pcap].reshape(B, G, kvh, rep, Pcap).transpose(1, 2).reshape(B, kvh, G * rep, Pcap)
    o_prefix = (p_prefix @ st.prefix_v[layer]).reshape(B, kvh, G, rep, dv).transpose(1, 2)  # (B, G, kvh, rep, dv)
    o_decode = probs[..., Pcap:Pcap + st.T] @ st.decode_v[layer]  # (N, kvh, rep, dv)
    return (o_prefix.reshape(N, kvh, rep, dv) + o_decode).reshape(N, 1, kvh * rep, dv)


def _rollout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       softcap=None, sliding_window=None, s_aux=None, **kwargs):
    """transformers' attention-function signature; `attention_mask` is None (we keep our own);
    `s_aux` holds the heads' attention sinks (gpt-oss)."""
    st = _ACTIVE
    if st is None:
        raise RuntimeError(f"attn_implementation={ATTENTION_NAME!r} only works inside generate_rollouts; "
                           "set the model's attention implementation back to 'sdpa' or 'eager'")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    attend = _prefill_attention if st.mode == "prefill" else _decode_attention
    return attend(st, module.layer_idx, query, key, value, scaling, softcap, sliding_window, s_aux), None


AttentionInterface.register(ATTENTION_NAME, _rollout_attention)


def _catch_user_states(module, args, output):
    """Forward hook on the decoder during a rollout: h of the rows whose final token is fed now.

    output[0] is the decoder's normalised hidden state, (B, P, D) in the prefill, (N, 1, D) in
    a decode step. The write is a `torch.where` into the preallocated `user_states`, so a
    captured decode step records it and every replay repeats it; no host sync.

    A module-level function reading the `_ACTIVE` state (as the attention does), not a closure
    over one state: under `compile_step`, dynamo inlines the model call and traces this hook
    into the compiled step, but by default (`skip_nnmodule_hook_guards`) it does not guard on
    hooks, so what it traced is reused as is; a closure would keep writing the first state's
    buffer. Since the hook is registered around every call of the step, each trace includes it.
    """
    st = _ACTIVE
    if st is None:
        return
    hidden = output[0]
    if st.mode == "prefill":
        if st.user_states is None:
            st.user_states = hidden.new_zeros(st.N, hidden.shape[-1], dtype=torch.float32)
        return
    h = hidden[:, -1].float()  # (N, D) of the token fed this step
    st.user_states.copy_(torch.where(st.stopped_now[:, None], h, st.user_states))  # (N, D)


# ----------------------------------------------------------------------------------------------
# Steps: prefill, token choice, decode


def _choose(st: _DecodeState, logits: torch.Tensor):
    """Pick token `step` for every row, record it, run the stop test; all on the device.

    logits (N, V) float32. A row that samples an end of turn, or is still going at `force_from`,
    gets the forced stop sequence from there on instead of samples (the rest of it, when its last
    tokens already begin it: `_written_prefix`); a token that completes a
    stop pattern is replaced by the pattern's last id; stopped rows get padding, log-prob 0 and
    mask 0. `stopped_now` marks the rows this token ends, whose h the next step's decoder output is.
    """
    token = _sample_tokens(logits, st.sampling)  # (N,)
    ends_turn = st.is_end[token] & ~st.stopped & (st.step < st.force_start)  # (N,)
    st.force_start.copy_(torch.where(ends_turn, st.step, st.force_start))
    starts = (st.step == st.force_start) & ~st.stopped  # (N,) the row's first forced step
    st.force_start.sub_(torch.where(starts, _written_prefix(st), 0))
    forced = (st.step >= st.force_start) & ~st.stopped  # (N,)
    force_index = (st.step - st.force_start).clamp(0, len(st.forced_ids) - 1)  # (N,)
    token = torch.where(forced, st.forced_ids[force_index], token)
    window = torch.cat([st.recent, token[:, None]], 1)  # (N, L)
    matches = st.stop_allowed[:, st.window_index, window].all(-1)  # (P, N)
    hit = matches.any(0) & ~st.stopped  # (N,)
    token = torch.where(hit, st.stop_last[matches.int().argmax(0)], token)
    token = torch.where(st.stopped, st.pad_token_id, token)  # (N,)
    temperature = st.sampling.policy_temperature
    scaled = logits if temperature == 1 else logits / temperature  # (N, V); no copy by default
    logp = scaled.gather(1, token[:, None]) - scaled.logsumexp(-1, keepdim=True)  # (N, 1)
    logp = logp.masked_fill(st.stopped[:, None], 0.0)
    st.completion.index_copy_(1, st.step, token[:, None])
    st.logprobs.index_copy_(1, st.step, logp)
    st.completion_mask.index_copy_(1, st.step, ~st.stopped[:, None])
    st.recent.copy_(torch.cat([st.recent, token[:, None]], 1)[:, 1:])  # (N, L - 1)
    st.stopped_now.copy_(hit)
    st.stopped |= hit
    st.tokens.copy_(token[:, None])
    st.step += 1


def _written_prefix(st: _DecodeState) -> torch.Tensor:
    """`StopRule.written_prefix` of every row's tokens before this step, on the device.  -> (N,)"""
    written = torch.zeros_like(st.force_start)
    for k in range(1, len(st.forced_ids)):
        spelled = st.forced_heads[st.head_index[:k], st.recent[:, -k:]].all(1)  # (N,) last k tokens
        written = torch.where(spelled, k, written)
    return written


def _decode_step(model, st: _DecodeState):
    """Feed token `step - 1` of every row, choose token `step`. Captured as one CUDA graph.

    The model forward also runs `_catch_user_states` (a hook on its decoder), which keeps h of
    the rows that token `step - 1` ends.
    """
    st.slot.copy_(st.step - 1)
    st.positions.copy_(st.prompt_len + st.slot)  # (N, 1)
    decode_bias = torch.where(st.slots < st.step, 0.0, NEG).expand(st.N, -1)  # (N, T) written slots
    full = torch.cat([st.prefix_bias, decode_bias], 1)  # (N, Pcap + T)
    st.bias[None].copy_(full[:, None, None])
    if st.windows:
        key_positions = torch.cat([st.prefix_positions, st.prompt_len + st.slots], 1)  # (N, Pcap + T)
        for window in st.windows:
            inside = in_sliding_window(st.positions, key_positions, window)  # (N, Pcap + T)
            st.bias[window].copy_(torch.where(inside, full, NEG)[:, None, None])
    logits = model(input_ids=st.tokens, position_ids=st.positions, use_cache=False,
                   logits_to_keep=1).logits[:, -1].float()  # (N, V)
    _choose(st, logits)


def _prefill(model, st: _DecodeState, prompt_ids, prompt_mask) -> torch.Tensor:
    """Run the B prompts once, filling the prefix buffers.  -> logits of token 0 (N, V)."""
    positions = mask_positions(prompt_mask)  # (B, P)
    st.start(prompt_mask, positions)
    logits = model(input_ids=prompt_ids, position_ids=positions, use_cache=False,
                   logits_to_keep=last_positions(prompt_ids, 1)).logits[:, -1].float()  # (B, V)
    layers = getattr(_base_model(model).config.get_text_config(), "num_hidden_layers", len(st.prefix_k))
    if len(st.prefix_k) != layers:  # the decode steps would attend without the prompt, silently
        raise UserError(attention_interface_error(f"only {len(st.prefix_k)} of the backbone's {layers} attention "
                                                  "layers ran through the rollout engine"))
    st.prompt_mask = None
    st.mode = "decode"
    for window in (None, *st.windows):
        st.bias.setdefault(window, torch.empty(st.N, 1, 1, st.Pcap + st.T, device=logits.device))
    return logits.repeat_interleave(st.G, 0)  # (N, V)


def _capture(model, st: _DecodeState):
    """Record one decode step as a CUDA graph over the state's buffers, or remember that the
    model's step does what a capture forbids (a host sync, as some mixture-of-experts routing
    has) and decode without graphs (slower, with a warning). Other errors, running out of memory
    included, propagate. The decoder hook must be registered here already: its writes are part
    of the graph.
    """
    _warm_up(model, st)
    try:
        st.graph = _record_graph(model, st)
    except RuntimeError as e:
        cause = e.__context__ if isinstance(e.__context__, RuntimeError) else e  # not capture_end's follow-up
        if isinstance(cause, torch.OutOfMemoryError):
            raise cause
        _UNCAPTURABLE.add(model)
        warnings.warn(f"the decode step of {type(_base_model(model)).__name__} cannot be captured as a CUDA graph "
                      f"({one_line(cause)}): decoding without one, slower", RuntimeWarning, stacklevel=3)


def _warm_up(model, st: _DecodeState):
    """Two decode steps before a capture (cuBLAS handles, lazy allocations, a torch.compile'd
    forward's compilation), on a side stream, as torch.cuda.graphs asks. They scribble on the
    state, which `reset_outputs` clears; `step` is set to 1 so their writes stay inside the buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            st.step.fill_(1)
            st.step_fn(model, st)
    torch.cuda.current_stream().wait_stream(side)


def _record_graph(model, st: _DecodeState) -> "torch.cuda.CUDAGraph":
    stream = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            st.step_fn(model, st)
    finally:
        torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture's stream current
    return graph


# ----------------------------------------------------------------------------------------------
# Cached states per model

_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_UNCAPTURABLE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models whose capture failed


def _state_for(model, num_prompts, num_samples, prompt_len, sampling, stop, pad_token_id, device,
               compile_step):
    """The decode state of this shape, reused (with its graph) when the shape was seen before.

    Autocast is part of the shape: it sets the dtype of the key/value buffers, and a captured
    graph replays the casts it recorded. So are PEFT's adapter switches (disabled, merged, which
    are active): Python branches that a graph replays as captured. A state built for other parameter addresses is dropped,
    so moving or re-allocating the weights (`.to`, re-loading) drops the stale graphs; in-place
    updates (optimizer steps) are read live. A prompt longer than the state's prefix capacity
    replaces the state with one of at least twice the capacity, so training's varying prompt
    lengths settle after a few captures (and compilations) instead of one per length bucket.
    """
    states = _STATES.setdefault(model, OrderedDict())
    weights = tuple(p.data_ptr() for p in model.parameters())
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (num_prompts, num_samples, sampling, stop, pad_token_id, str(device), compile_step, autocast,
           _adapter_switches(model))
    st = states.pop(key, None)
    capacity = prompt_len
    if st is not None and st.weights != weights:
        st = None
    elif st is not None and st.Pcap < prompt_len:
        capacity, st = max(prompt_len, 2 * st.Pcap), None
    if st is None:
        capacity = PREFIX_BUCKET * math.ceil(capacity / PREFIX_BUCKET)
        vocab_size = _base_model(model).get_output_embeddings().weight.shape[0]
        step_fn = torch.compile(_decode_step, dynamic=False) if compile_step else _decode_step
        st = _DecodeState(num_prompts, num_samples, capacity, sampling, stop, pad_token_id, vocab_size, device,
                          weights, step_fn)
    states[key] = st  # most recently used last
    while len(states) > MAX_CACHED_SHAPES:
        states.popitem(last=False)
    return st


def _adapter_switches(model) -> frozenset:
    """The distinct (disabled, merged adapters, active adapters) of the model's PEFT layers."""
    return frozenset((layer.disable_adapters, tuple(layer.merged_adapters), tuple(layer.active_adapters))
                     for layer in model.modules() if isinstance(layer, BaseTunerLayer))


def replays_graphs(device: torch.device) -> bool:
    """Whether decoding on `device` replays a graph captured per shape (only CUDA has them)."""
    return device.type == "cuda"


def clear_rollout_cache(model=None):
    """Free the decode buffers and graphs kept for `model` (every model when None); a failed
    capture is tried again."""
    if model is None:
        _STATES.clear()
        _UNCAPTURABLE.clear()
    else:
        _STATES.pop(model, None)
        _UNCAPTURABLE.discard(model)


@contextmanager
def _without_autocast_cache(device: torch.device):
    """Inside an enclosing autocast region, cast weights afresh instead of reading the region's
    cache: its copies predate in-place updates made since (optimizer steps), and a graph captured
    over them would read memory freed when the region ends."""
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    with torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False):
        yield


@contextmanager
def _active(st: _DecodeState):
    """Make `st` the state `_rollout_attention` reads (a global: transformers passes it nothing)."""
    global _ACTIVE
    _ACTIVE = st
    try:
        yield
    finally:
        _ACTIVE = None


# ----------------------------------------------------------------------------------------------
# Entry points


def generate_rollouts(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int,
                      sampling: SamplingConfig, stop: StopRule, pad_token_id: int,
                      *, compile_step: bool = False) -> Rollouts:
    """`num_samples` (= G) reasonings per prompt, each ending as `stop` says.

    prompt_ids, prompt_mask (num_prompts, P) left-padded, on the model's device. A row stops
    when its generated tokens end with a pattern of `stop`; a row that ends its turn, or is
    still going after `max_new_tokens - len(stop.forced)` tokens, gets `stop.forced` (its rest, when
    the row's last tokens begin it), so every row ends with a stop within `max_new_tokens`. On
    a GPU the decode step is a replayed CUDA graph; the CPU runs the same steps without one.
    `compile_step=True` runs the decode step through `torch.compile` on either (on a GPU, fused
    kernels inside the graph; the first call of each shape pays the compilation).
    `user_states` holds each row's h at its last token, as `encode` (model.py) of prompt + reasoning
    gives it (in eval mode, the mode of generation), so the caller need not run that forward.
    """
    _check_inputs(prompt_ids, prompt_mask, num_samples, sampling, stop)
    device = prompt_ids.device
    B, P = prompt_ids.shape
    st = _state_for(model, B, num_samples, P, sampling, stop, pad_token_id, device, compile_step)
    use_graph = replays_graphs(device) and model not in _UNCAPTURABLE
    # The user-state hook is registered for the whole call, outside the (possibly compiled)
    # step, so the warm-up, the capture and every eager or compiled step run it: a captured
    # graph records its write, dynamo traces it in (no graph break, no recompilation per call).
    check_attention_interface(model)
    with (_generation_mode(model, ATTENTION_NAME), _without_autocast_cache(device), _active(st),
          decoder_hook(model, _catch_user_states)):
        logits = _prefill(model, st, prompt_ids, prompt_mask)  # (N, V)
        if use_graph and st.graph is None:
            _capture(model, st)
            st.reset_outputs()  # undo the warm-up's writes
        use_graph = use_graph and st.graph is not None
        _choose(st, logits)
        for step in range(1, st.T + 1):  # step T only feeds token T-1, for the h of rows ending there
            if step % CHECK_EVERY == 0 and bool((st.stopped & ~st.stopped_now).all()):
                break  # every row has stopped and its final token has been fed
            if use_graph:
                st.graph.replay()
            else:
                st.step_fn(model, st)
    length = int(st.completion_mask.sum(1).max())
    return Rollouts(
        prompt_ids.repeat_interleave(num_samples, 0),
        prompt_mask.repeat_interleave(num_samples, 0),
        st.completion[:, :length].clone(),
        st.completion_mask[:, :length].to(prompt_mask.dtype, copy=True),
        st.logprobs[:, :length].clone(),
        st.user_states.clone(),
    )


def fresh_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """One plain forward pass (the model's own attention) over prompt + completion, eval mode.

    (N, P) and (N, C) -> log π(completion token) (N, C) float32 with π = softmax(logits /
    temperature), 0 off the mask, and h (N, D) float32: model.py's `policy_forward`, one
    [prompt | completion] row per sequence (the update's `shared_prompt_forward` gives the same
    per reasoning). The reference, the tests and the benchmark use it.
    """
    ids = torch.cat([prompt_ids, completion_ids], 1)  # (N, P + C)
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1)
    with _generation_mode(model):
        logp, h = policy_forward(model, ids, mask, completion_ids.shape[1], temperature)
    return logp * completion_mask, h.float()


def plain_generate(model, generation_config: GenerationConfig, **inputs) -> torch.Tensor:
    """`model.generate` under `generation_config` alone. `generate` fills the fields it leaves unset
    from the model's own config (a backbone's eos ids, repetition penalty): lend it a blank one."""
    base = _base_model(model)
    own_config, base.generation_config = base.generation_config, GenerationConfig()
    try:
        return model.generate(generation_config=generation_config, **inputs)
    finally:
        base.generation_config = own_config


class _StopCriterion(StoppingCriteria):
    """`generate` stopping criterion: the generated tokens end with a stop pattern or an end of turn."""

    def __init__(self, stop: StopRule, prompt_len: int):
        self.stop, self.prompt_len = stop, prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:].tolist()  # (N, t)
        ended = [row[-1] in self.stop.end_ids or self.stop.match(row) is not None for row in new]
        return torch.tensor(ended, device=input_ids.device)


def _cut_or_force(tokens: list[int], stop: StopRule) -> list[int]:
    """Tokens up to the first completed stop pattern, its last token replaced as the rule says;
    at an end of turn, or when none completes, the forced stop instead (its rest, when the last
    tokens begin it), one token at a time until a pattern completes (as the engine does)."""
    out = []
    for token in tokens:
        if token in stop.end_ids:
            break
        out.append(token)
        last = stop.match(out)
        if last is not None:
            return out[:-1] + [last]
    for token in stop.forced[stop.written_prefix(out):]:
        out.append(token)
        if stop.match(out) is not None:
            break
    return out


def generate_rollouts_reference(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int,
                                sampling: SamplingConfig, stop: StopRule,
                                pad_token_id: int) -> Rollouts:
    """The same contract through plain `generate` (tests and benchmark only: it is slow).

    `generate` runs `max_new_tokens - len(stop.forced)` tokens with the rule as its criterion and
    nothing of the model's own generation config (eos ids, repetition penalty), as the engine; the
    host then cuts each row after its first stop or appends the forced stop, and one forward
    pass over prompt + completion gives the log-probs and the user states h.
    """
    _check_inputs(prompt_ids, prompt_mask, num_samples, sampling, stop)
    budget = sampling.max_new_tokens - len(stop.forced)
    P = prompt_ids.shape[1]
    prompt_ids = prompt_ids.repeat_interleave(num_samples, 0)  # (N, P); rows, not num_return_sequences,
    prompt_mask = prompt_mask.repeat_interleave(num_samples, 0)  # which greedy decoding refuses
    generated = [[] for _ in range(len(prompt_ids))]
    if budget > 0:
        filters = {} if sampling.greedy else dict(temperature=sampling.temperature, top_k=sampling.top_k,
                                                  top_p=sampling.top_p)
        config = GenerationConfig(do_sample=not sampling.greedy, pad_token_id=pad_token_id, eos_token_id=None,
                                  max_new_tokens=budget, **filters)
        with _generation_mode(model):
            out = plain_generate(model, config, input_ids=prompt_ids, attention_mask=prompt_mask,
                                 stopping_criteria=StoppingCriteriaList([_StopCriterion(stop, P)]))
        generated = out[:, P:].tolist()
    rows = [_cut_or_force(r, stop) for r in generated]
    width = max(map(len, rows))
    completion = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=prompt_ids.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=prompt_ids.device)
    logprobs, user_states = fresh_forward(model, prompt_ids, prompt_mask, completion, mask, sampling.policy_temperature)
    return Rollouts(prompt_ids, prompt_mask, completion, mask.to(prompt_mask.dtype), logprobs, user_states)
