"""Time one RecPO update (SPEC §4.5–4.7: token + item loss, forward and backward per micro-batch)
on a fixed batch of rollouts, the way `RecPOTrainer.training_step` runs it after the rollout.
Run from the repo root:

    python bench/bench_update.py                           # CPU: SmolLM2-135M, the sample (after the quick start)
    python bench/bench_update.py --model /tmp/qwen3b       # GPU: a make_random_backbone.py folder
    python bench/bench_update.py --repo /tmp/old_checkout  # the same batch through another version (62472cd+)

The batch: the `--users` training samples of `--dataset_dir` with the longest histories, `--group` completions each of
`--new_tokens` random tokens ending in `<answer>`, sampler log-probs from one no-grad forward (only
for `rollout/logprob_gap`: the first update takes π_old from its own forward, so the ratios are 1,
as on-policy), random advantages, relabel top-1. The model is LoRA-wrapped (SPEC §4
defaults), gradient checkpointing on, bf16 with the trainer's own autocast. Each repeat is one
`update` call, device-synchronised; the first is a warm-up and not counted. `--profile` adds
one profiled call and prints its top operators by self time.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample", "Video_Games_0_2022-10-2023-10")  # written by the quick start
sys.path.insert(1, ROOT)  # errors.py; main() puts --repo before it
from errors import UserError, run_cli  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="key, alias or folder (paths.py)")
    p.add_argument("--repo", default=ROOT, help="checkout whose trainer.py/model.py to time")
    p.add_argument("--dataset_dir", default=SAMPLE,
                   help="preprocess.py output (default: the sample, after "
                        "`python preprocess.py --category Video_Games --data_root_dir data/sample`)")
    p.add_argument("--users", type=int, default=4, help="B")
    p.add_argument("--group", type=int, default=4, help="G")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=256, help="completion length of every trajectory")
    p.add_argument("--repeats", type=int, default=3, help="timed update calls (after one warm-up)")
    p.add_argument("--profile", action="store_true", help="then profile one more call: its top operators")
    args = p.parse_args()
    small = [f"--{name} {getattr(args, name)}" for name in ("users", "group", "micro_batch_size", "new_tokens",
                                                            "repeats") if getattr(args, name) < 1]
    if small:
        raise UserError(f"{', '.join(small)}: must be at least 1")
    if not os.path.isdir(args.repo):
        raise UserError(f"--repo {args.repo!r} is not a folder — pass a checkout of this project")

    sys.path.insert(0, os.path.abspath(args.repo))
    try:
        from dataset import load_dataset_dir
        from model import add_lora, enable_checkpointing, load_backbone, policy_forward
        from rollouts import Rollouts
        from trainer import RecPOBatch, RecPOConfig, RecPOTrainer, relabel_mask
    except ImportError as e:
        raise UserError(f"--repo {args.repo!r} lacks this benchmark's interfaces ({e}) — pass a checkout of "
                        "62472cd or later (dataset.py, model.enable_checkpointing)") from e

    cuda = torch.cuda.is_available()
    config = RecPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=not cuda, report_to="none", per_device_train_batch_size=args.users,
        group_size=args.group, micro_batch_size=args.micro_batch_size, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, eval_on_start=False, window_size=20, dataset_dir=args.dataset_dir,
    )
    dataset, category = load_dataset_dir(config.dataset_dir, config.dataset_category)
    if len(dataset["train"]) < args.users:
        raise UserError(f"--users {args.users}: {args.dataset_dir!r} has only {len(dataset['train'])} training "
                        "samples — lower --users")
    model, tokenizer = load_backbone(args.model)
    model = add_lora(model)
    enable_checkpointing(model)
    trainer = RecPOTrainer(model, config, tokenizer, dataset, category)
    wrapped = trainer.accelerator.prepare_model(model)
    hidden = model.config.get_text_config().hidden_size
    trainer.item_table.embeddings = torch.zeros(len(trainer.item_table), hidden)  # `update` writes rows into it

    train = dataset["train"]
    longest = sorted(range(len(train)), key=lambda i: -len(train[i]["history_item_id"]))[:args.users]
    samples = [train[i] for i in longest]
    prompt_ids, prompt_mask = trainer.tokenize_prompts(samples)
    prompt_ids, prompt_mask = (t.repeat_interleave(args.group, 0) for t in (prompt_ids, prompt_mask))
    num = args.users * args.group
    generator = torch.Generator().manual_seed(0)
    stop = list(trainer.stop.forced)
    if args.new_tokens <= len(stop):
        raise UserError(f"--new_tokens {args.new_tokens}: the completion ends in {len(stop)} stop tokens — "
                        f"use at least {len(stop) + 1}")
    body = torch.randint(1000, 20000, (num, args.new_tokens - len(stop)), generator=generator)
    completion_ids = torch.cat([body, torch.tensor(stop).expand(num, -1)], 1).to(prompt_ids.device)
    completion_mask = torch.ones_like(completion_ids)
    with torch.no_grad():
        old, user_states = policy_forward(wrapped, torch.cat([prompt_ids, completion_ids], 1),
                                          torch.cat([prompt_mask, completion_mask], 1), args.new_tokens)
    advantages = torch.randn(num, generator=generator).to(prompt_ids.device)
    relabel = relabel_mask(advantages.view(-1, args.group), 1).flatten()
    targets = torch.tensor([s["item_id"] for s in samples], device=prompt_ids.device)
    batch = RecPOBatch(Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, old, user_states.float()),
                       targets, advantages, relabel, None)  # p_old: none (older checkouts need the argument)

    seconds = []
    for _ in range(args.repeats + 1):
        wrapped.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if cuda else None
        start = time.perf_counter()
        trainer.update(wrapped, batch)
        torch.cuda.synchronize() if cuda else None
        seconds.append(time.perf_counter() - start)
    version = subprocess.run(["git", "-C", args.repo, "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True).stdout.strip()[:60]
    tokens = num * (prompt_ids.shape[1] + args.new_tokens)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.model} on {device}; B {args.users} × G {args.group}, micro-batch {args.micro_batch_size}, "
          f"prompt {prompt_ids.shape[1]} + {args.new_tokens} new tokens")
    print("| version | update (median) | runs | trajectory tokens/s |")
    print("|---|---|---|---|")
    median = statistics.median(seconds[1:])
    runs = ", ".join(f"{s:.2f}" for s in seconds[1:])
    print(f"| {version} | {median:.2f} s | {runs} | {tokens / median:,.0f} |")
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profile:
            wrapped.zero_grad(set_to_none=True)
            trainer.update(wrapped, batch)
            torch.cuda.synchronize() if cuda else None
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(profile.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    run_cli(main)
