"""Rollout speed: Hugging Face `generate` (dynamic cache), `generate` (static cache + compile) and
our `generate_rollouts`, in new tokens/s, on random-weight Qwen2.5-3B- and Gemma-2-2b-shaped
models, beside the memory-bandwidth roofline; plus greedy identity with `generate` at full size.
Run from the repo root:

    python bench/bench_rollout.py --out /tmp/rollout.jsonl          # GPU: the table of bench/RESULTS.md
    python bench/bench_rollout.py --tiny                             # CPU smoke run of every path

Shapes (issue 6): 16 prompts × 4 samples, 384-token prompts, 256 new tokens; and 64 × 4, 384,
128 new. Sampling as in training (temperature 2.0, top-k 50); the stop sequence is one a
random model never writes, so every row runs the full length (ours forces it at the end).
Roofline = N / (bytes one decode step must read / measured copy bandwidth), the bytes being the
weights plus the KV cache of N separate rows at the mean length (what `generate` reads).

The run is budgeted (`--budget_s`): the required rows first (correctness, ours and plain
`generate` for both models and shapes), then the ones that pay a compilation (`generate` with a
static cache compiles its forward, ours with `compile_step=True`: rows `ours_compile`, `ours_lora_compile`), each only while time is left.
Every finished row is appended to `--out` at once, so a run cut short keeps what it measured;
`--rows` runs only some kinds of row, the compiled ones in the order given (e.g.
`--rows hf_static_compile ours_compile` for the ones a budgeted run skipped).
"""
import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import add_lora, attention_implementation  # noqa: E402  (the repo root joins the path first)
from prompts import StopRule  # noqa: E402
from rollouts import (  # noqa: E402
    SamplingConfig,
    clear_rollout_cache,
    fresh_forward,
    generate_rollouts,
    generate_rollouts_reference,
    plain_generate,
)

PAD = 0
SHAPES = [(16, 4, 384, 256), (64, 4, 384, 128)]  # prompts, samples per prompt, prompt length, new tokens
TINY_SHAPES = [(2, 2, 16, 8), (4, 2, 16, 6)]


def qwen25_3b(tiny=False):
    if tiny:
        return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)


def gemma2_2b(tiny=False):
    if tiny:
        return Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    return Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                        max_position_embeddings=8192)


MODELS = {"qwen2.5-3b": qwen25_3b, "gemma-2-2b": gemma2_2b}
ROWS = ("greedy_fp32", "greedy_bf16", "sampled_logprobs", "ours", "ours_lora", "hf_dynamic", "ours_compile",
        "hf_static_compile", "ours_lora_compile")


# ----------------------------------------------------------------------------------------------
# Building blocks


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read plus written per second (the roofline's ceiling)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    sync(device)
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def build(name, tiny, device, dtype):
    """Random weights, built on the device (no host copy of 3B parameters), with the attention
    implementation load_backbone would give the model (eager for Gemma-2)."""
    torch.manual_seed(0)
    with torch.device(device):
        config = MODELS[name](tiny)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attention_implementation(config))
    return model.eval()


def roofline(model, N, P, new, bandwidth) -> float:
    """tok/s if one decode step only read the weights and N unshared caches at mean length."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * model.dtype.itemsize
    return N * bandwidth / (weights + N * (P + new / 2) * kv_per_token)


def random_prompts(vocab, lengths, device, seed=0):
    """Left-padded prompts of the given lengths.  -> ids, mask (B, max(lengths))."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), P), generator=g)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, P - n:] = 1
    return ids.masked_fill(mask == 0, PAD).to(device), mask.to(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# Rows of the table


def check_greedy(model, dtype, device):
    """Ours against `generate`, greedy, left-padded prompts, G = 2, 32 new tokens, one natural stop;
    the forced stop's first two tokens are the last two that a row running out of budget writes,
    so that row gets only the third (`StopRule.written_prefix`, on the device in the graph)."""
    model.to(dtype)
    vocab = model.config.vocab_size
    ids, mask = random_prompts(vocab, [48, 30, 64, 17], device, seed=1)
    greedy = SamplingConfig(max_new_tokens=32, greedy=True)
    never = StopRule.exact([[vocab - 1] * 3])
    free = generate_rollouts_reference(model, ids, mask, 1, greedy, never, PAD).completion_ids
    row = free[0].tolist()
    stop = next((t for i, t in enumerate(row) if i >= 8 and t not in row[:i]), vocab - 1)
    budget = greedy.max_new_tokens - 3  # tokens a row writes before a 3-token forced stop
    running = next((r for r in free.tolist()[1:] if stop not in r[:budget]), None)
    written = running[budget - 2:budget] if running else [vocab - 2, vocab - 3]
    forced = (*written, vocab - 1)
    # row 0 stops after ~8 tokens on a token it writes; the others are forced, `running` only its last token
    stops = StopRule(patterns=((frozenset([stop]),), tuple(frozenset([t]) for t in forced)), last_ids=(stop, forced[-1]),
                     forced=forced)
    ref = generate_rollouts_reference(model, ids, mask, 2, greedy, stops, PAD)
    ours = generate_rollouts(model, ids, mask, 2, greedy, stops, PAD)
    width = max(ref.completion_ids.shape[1], ours.completion_ids.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=PAD)
    a, b = pad(ref.completion_ids), pad(ours.completion_ids)
    same = (a == b).all(1)
    first_diff = [int((a[i] != b[i]).nonzero()[0]) for i in range(len(a)) if not same[i]]
    lp = (ref.logprobs - ours.logprobs).abs()[same].max().item() if same.all() else float("nan")
    h = (ref.user_states - ours.user_states).abs()[same].max().item() if same.any() else float("nan")  # fresh vs ours
    return dict(rows_identical=f"{int(same.sum())}/{len(same)}", first_divergence=first_diff,
                max_logprob_diff=lp, max_user_state_diff=h, lengths=ours.completion_mask.sum(1).tolist())


def check_sampled_logprobs(model, device):
    """Ours (sampled, bf16) against one fresh forward of the model's own attention: log-probs, and
    the user states h as cosine (bf16 kernels differ between a decode step and a full forward)."""
    vocab = model.config.vocab_size
    ids, mask = random_prompts(vocab, [64, 40, 64, 20], device, seed=2)
    sampling = SamplingConfig(32, temperature=2.0, top_k=50)
    r = generate_rollouts(model, ids, mask, 4, sampling, StopRule.exact([[vocab - 1]]), PAD)
    fresh, h = fresh_forward(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                             sampling.policy_temperature)
    diff = (fresh - r.logprobs).abs()[r.completion_mask.bool()]
    cosine = torch.nn.functional.cosine_similarity(r.user_states, h, dim=-1)  # (N,)
    return dict(max_abs=diff.max().item(), mean_abs=diff.mean().item(), mean_logprob=r.logprobs.sum().item()
                / r.completion_mask.sum().item(), min_user_state_cosine=cosine.min().item())


def run_ours(model, shape, device, runs, compile_step=False):
    B, G, P, new = shape
    vocab = model.config.vocab_size
    ids, mask = random_prompts(vocab, [P] * B, device)
    sampling = SamplingConfig(max_new_tokens=new, temperature=2.0, top_k=50)
    stop = StopRule.exact([[vocab - 1, vocab - 2]])
    call = lambda: generate_rollouts(model, ids, mask, G, sampling, stop, PAD,
                                     compile_step=compile_step)
    first, warm = timed(call, device)  # prefill + capture (+ compilation) + one full rollout
    times = []
    for _ in range(runs):
        r, t = timed(call, device)
        times.append(t)
    tokens = int(r.completion_mask.sum())
    assert torch.isfinite(r.logprobs).all() and tokens <= B * G * new
    t = sorted(times)[len(times) // 2]
    return dict(tok_s=tokens / t, ms_step=1e3 * t / new, first_call_s=warm, tokens=tokens)


def run_ours_lora(model, shape, device, runs, compile_step=False):
    """`run_ours` on the model as training rolls out with it: LoRA (model.add_lora, r 4 on every
    projection) and bf16 autocast around each forward, as accelerate wraps it. The difference to
    `ours` is what the adapters' extra small kernels cost; `compile_step` (training's
    `--compile_rollouts`) fuses some of them. The adapters are removed afterwards."""
    wrapped = add_lora(model)
    wrapped.forward = torch.autocast(device.type, dtype=torch.bfloat16)(wrapped.forward)
    try:
        return run_ours(wrapped, shape, device, runs, compile_step)
    finally:
        clear_rollout_cache(wrapped)
        wrapped.unload()


def run_hf(model, shape, device, static, new_tokens=None):
    """Plain `generate` with the same sampling; `static`: static cache, which `generate` compiles."""
    B, G, P, new = shape
    new = new_tokens or new
    vocab = model.config.vocab_size
    ids, mask = random_prompts(vocab, [P] * B, device)
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    cache = dict(cache_implementation="static") if static else {}

    def call(n):
        config = transformers.GenerationConfig(do_sample=True, temperature=2.0, top_k=50, eos_token_id=None,
                                               pad_token_id=PAD, max_new_tokens=n, **cache)
        return plain_generate(model, config, input_ids=ids, attention_mask=mask)

    with torch.no_grad():
        _, warm = timed(lambda: call(new if static else 4), device)  # static: same shape, pays the compile
        out, t = timed(lambda: call(new), device)
    tokens = (out.shape[1] - P) * len(ids)
    return dict(tok_s=tokens / t, ms_step=1e3 * t / new, first_call_s=warm, tokens=tokens)


# ----------------------------------------------------------------------------------------------
# Entry point


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budget_s", type=float, default=290, help="stop starting rows after this many seconds")
    parser.add_argument("--runs", type=int, default=3, help="timed calls of ours (median)")
    parser.add_argument("--out", default=None, help="append one JSON line per row here")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="kinds of row to run (default: all), e.g. only the compiled ones")
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY_SHAPES if args.tiny else SHAPES
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device)
    env = dict(card=card, date=datetime.date.today().isoformat(), torch=torch.__version__,
               transformers=transformers.__version__, copy_TB_s=bandwidth / 1e12)
    print(json.dumps(env), flush=True)
    rows = []

    def record(row):
        row["elapsed_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**env, **row}) + "\n")

    def attempt(what, fn, cost_s, **keys):
        """One row, skipped when its estimated cost no longer fits the budget, errors recorded."""
        if what not in args.rows:
            return
        left = args.budget_s - (time.perf_counter() - t0)
        if cost_s > left:
            return record({"what": what, **keys, "skipped": f"needs ~{cost_s:.0f} s, {left:.0f} s left"})
        try:
            record({"what": what, **keys, **fn()})
        except Exception as e:  # a failing row must not lose the others
            record({"what": what, **keys, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def hf_cost(shape, static):
        B, G, _, new = shape
        return (120 if static else 5) + B * G * new / (7000 if B * G > 64 else 2500)

    loaded = {}  # at most one model on the device at a time

    def load(name):
        if name not in loaded:
            for other in list(loaded):
                clear_rollout_cache(loaded.pop(other))
            gc.collect()
            loaded[name] = build(name, args.tiny, device, dtype)
        return loaded[name]

    def keys(name, shape):
        N, P, new = shape[0] * shape[1], shape[2], shape[3]
        return dict(model=name, shape="x".join(map(str, shape)),
                    roofline_tok_s=roofline(load(name), N, P, new, bandwidth))

    # Pass 1: correctness and the rows that compile nothing, model by model.
    compiled = ("ours_compile", "hf_static_compile", "ours_lora_compile")
    for name in args.models if set(args.rows) - set(compiled) else []:
        model = load(name)
        attempt("greedy_fp32", lambda: check_greedy(model, torch.float32, device), 30, model=name)
        attempt("greedy_bf16", lambda: check_greedy(model, dtype, device), 20, model=name)
        model.to(dtype)
        attempt("sampled_logprobs", lambda: check_sampled_logprobs(model, device), 10, model=name)
        for shape in shapes:
            attempt("ours", lambda: run_ours(model, shape, device, args.runs), 15, **keys(name, shape))
            attempt("ours_lora", lambda: run_ours_lora(model, shape, device, args.runs), 15, **keys(name, shape))
            attempt("hf_dynamic", lambda: run_hf(model, shape, device, False), hf_cost(shape, False),
                    **keys(name, shape))
    # Pass 2: rows that pay a compilation, while the budget lasts, in the order --rows names them.
    for shape in shapes:
        for name in args.models:
            runs = {"ours_compile": (lambda: run_ours(load(name), shape, device, args.runs, True), 100),
                    "hf_static_compile": (lambda: run_hf(load(name), shape, device, True), hf_cost(shape, True)),
                    "ours_lora_compile": (lambda: run_ours_lora(load(name), shape, device, args.runs, True), 120)}
            for what in [row for row in args.rows if row in compiled]:
                attempt(what, *runs[what], **keys(name, shape))

    print(f"\n{card}, {env['date']}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"copy {bandwidth / 1e12:.2f} TB/s, {time.perf_counter() - t0:.0f} s")
    print("| model | N × prompt + new | method | tok/s | ms/step | first call s | roofline tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "tok_s" in r:
            print(f"| {r['model']} | {r['shape']} | {r['what']} | {r['tok_s']:,.0f} | {r['ms_step']:.2f} | "
                  f"{r['first_call_s']:.1f} | {r['roofline_tok_s']:,.0f} |")
        else:  # correctness rows, skipped and failed rows: their fields as they are
            rest = {k: v for k, v in r.items() if k not in ("what", "model", "shape", "roofline_tok_s")}
            print(f"| {r['model']} | {r.get('shape', '')} | {r['what']} | {json.dumps(rest)} |")


if __name__ == "__main__":
    main()
