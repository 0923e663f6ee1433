"""Command one of the README: R²ec end to end on the shipped sample data, on a CPU, in minutes.

    bash quickstart.sh                 # sets up .venv, then runs this file
    python quickstart.py --seed 1      # the same, in an existing environment

Steps: preprocess.py on data/sample (offline) → train.py (RecPO, embedded SmolLM2-135M-Instruct,
LoRA) with an evaluation before and after → a before/after table of valid/test NDCG and Hit,
and one test user's history, reasoning and top-5 recommendations with the true next item marked.
The settings are scaled down for two CPU cores (short histories and reasonings, few steps, a
high learning rate, no LoRA dropout); the full-scale defaults are train.py's own.
"""
import argparse
import json
import os
import signal
import subprocess
import sys

# errors.py before the libraries: its excepthook makes Ctrl-C while they import one line
from errors import UserError, check_int64, folder_problem, killed_by, one_line_parser_errors, run_cli

import torch

from curves import CURVES_FILE
from metrics import METRIC_NAMES
from model import offline_and_not_cached
from paths import DEFAULT_MODEL, resolve_model
from preprocess import check_replaceable
from run_folder import check_no_clash, earlier_run
from train import parse_config
from trainer import EVAL_SPLITS, reasoning_file

ROOT = os.path.dirname(os.path.abspath(__file__))
OUTPUT_DIR = os.path.join("outputs", "quickstart")  # overwritten by every quick start; no other folder is
CATEGORY = "Video_Games"
DATASET_DIR = os.path.join("data", "sample", f"{CATEGORY}_0_2022-10-2023-10")
WINDOW_SIZE = 5  # history lines per prompt
STEP_CLEANUP_S = 30  # an interrupted step removes its half-written output in this time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    one_line_parser_errors(parser, "python quickstart.py --help")
    parser.add_argument("--output_dir", default=OUTPUT_DIR, help=f"Any folder but {OUTPUT_DIR} must not hold a run.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=12, help="RecPO steps (8 users × 2 reasonings each)")
    parser.add_argument("--eval_samples", type=int, default=64, help="valid and test samples evaluated")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--float32", action="store_true",
                        help="Train in float32, not bf16: on CPUs without bf16 instructions about 2.3x faster, "
                             "but 15.5 instead of about 7 GiB of memory, and other figures than the README's.")
    args = parser.parse_args(argv)
    for flag in ("--seed", "--steps", "--eval_samples"):  # named here, not as train.py's flags they become
        check_int64(flag, getattr(args, flag[2:]))
    # --steps becomes train.py's --max_steps, where < 1 means "train whole epochs" (hours): checked here
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1 (the default is 12)")
    if args.eval_samples < 1:
        raise UserError(f"--eval_samples {args.eval_samples}: must be at least 1 (the default is 64)")
    parse_config(train_flags(args, bf16=not args.float32))  # train.py's flag checks, before preprocess.py runs
    args.output_dir = os.path.expanduser(args.output_dir)  # as train.py will read it
    output_dir = os.path.join(ROOT, args.output_dir)
    problem = folder_problem(output_dir)
    if problem:
        raise UserError(f"--output_dir {args.output_dir} {problem} — pass a folder you can write to")
    check_no_clash(output_dir, args.output_dir)
    if os.path.realpath(output_dir) != os.path.realpath(os.path.join(ROOT, OUTPUT_DIR)) and earlier_run(output_dir):
        raise UserError(f"--output_dir {args.output_dir} holds an earlier run, which the quick start would "
                        f"overwrite — pick a new folder, or delete that one (only {OUTPUT_DIR} is overwritten freely)")
    check_replaceable(os.path.join(ROOT, DATASET_DIR), or_else=" (the quick start writes its dataset there)")
    model = resolve_model(args.model)  # a placeholder or unknown name fails before preprocess.py runs
    if offline_and_not_cached(model):
        raise UserError(f"--model {args.model}: {model!r} is a hub id that is not in the Hugging Face cache, and "
                        f"the quick start runs offline (HF_HUB_OFFLINE=1) — download it first (hf "
                        f"download {model}), or pass a local model folder")
    return args


def run(command: list[str]):
    """Run one step; its failure ends the quick start with the step's own error line and code, or,
    killed by a signal (which leaves no line of its own), with one naming the step and the signal."""
    print("$", " ".join(command), flush=True)
    step = subprocess.Popen(command, cwd=ROOT)
    # `kill` of the quick start alone passes on to the step, which must not train on orphaned
    on_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: step.send_signal(signal.SIGTERM))
    try:
        code = step.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the step too (one process group), which says so itself
        try:
            code = step.wait(timeout=STEP_CLEANUP_S)
        except subprocess.TimeoutExpired:  # the interrupt was sent to this process alone
            step.send_signal(signal.SIGINT)
            code = step.wait()
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        if step.poll() is None:  # a second Ctrl-C: the step must not run on alone
            step.kill()
    if code < 0:
        memory_fix = "free some memory (the quick start peaks at about 7 GiB, 15.5 with --float32)"
        print(f"error: {os.path.basename(command[1])} was {killed_by(code, memory_fix)}", file=sys.stderr)
        code = 128 - code  # as a shell reports it
    if code != 0:
        sys.exit(code)


def cpu_lacks_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Training runs on a CPU known to lack bf16 instructions, which then emulates bf16 (the quick
    start on a 2-core Xeon without them: 28 min in bf16, 12 in float32). Known only on Linux: x86's
    `flags` (amx_bf16, avx512_bf16: the README's figures were measured with AVX512-BF16), ARM's `Features` (bf16)."""
    if torch.cuda.is_available():
        return False
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux: cannot tell
        return False
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return not set(value.split()) & {"amx_bf16", "avx512_bf16"}
        if key.strip() == "Features":
            return "bf16" not in value.split()
    return False


def bf16_note(float32: bool) -> str | None:
    """What to tell a user whose CPU emulates bf16."""
    if float32 or not cpu_lacks_bf16():
        return None
    return ("note: this CPU has no bf16 instructions, so bf16 runs emulated: on 2 cores the quick start takes "
            "about 30 min instead of 6; `bash quickstart.sh --float32` takes about 12 min (15.5 GiB of memory)")


def train_flags(args, bf16: bool) -> list[str]:
    """The toy run's flags. Learning rate 1e-3: at 2e-3 seed 2 collapsed every user and item state onto one
    direction (bench/RESULTS.md, stop 28)."""
    return [
        "--dataset_dir", DATASET_DIR, "--model", args.model, "--output_dir", args.output_dir,
        "--seed", str(args.seed), "--max_steps", str(args.steps), "--eval_steps", str(args.steps),
        "--max_eval_samples", str(args.eval_samples), "--eval_batch_size", str(args.eval_samples),
        "--window_size", str(WINDOW_SIZE), "--max_new_tokens", "16", "--train_batch_size", "8", "--group_size", "2",
        "--micro_batch_size", "16", "--learning_rate", "1e-3", "--warmup_steps", "0", "--lora_dropout", "0",
        "--gradient_checkpointing", "False", "--load_best_model_at_end", "False",
        "--report_to", "tensorboard", "--logging_steps", "1", "--overwrite_output_dir", "True",
        "--bf16", str(bf16), "--use_cpu", str(not torch.cuda.is_available()),  # the CPU is meant: no warning
    ]


def before_and_after(output_dir: str) -> tuple[dict, dict]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    before = next(entry for entry in history
                  if entry.get("step") == 0 and any(key.startswith("eval_valid_") for key in entry))
    with open(os.path.join(output_dir, "final_results.json")) as f:
        after = json.load(f)
    return before, after


def print_table(before: dict, after: dict):
    print(f"\n{'':14}" + "".join(f"{m:>9}" for m in METRIC_NAMES))
    for split in EVAL_SPLITS:
        for label, values in (("before", before), ("after", after)):
            row = "".join(f"{values[f'eval_{split}_{m}']:9.4f}" for m in METRIC_NAMES)
            print(f"{split + ' ' + label:14}{row}")


def print_example(output_dir: str):
    """The first test sample of the final evaluation, as `recommend.py` prints one, top 5 only."""
    from datasets import load_from_disk

    from recommend import format_sample

    dataset = load_from_disk(os.path.join(ROOT, DATASET_DIR))
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        step = json.load(f)["global_step"]
    with open(reasoning_file(output_dir, step, "test")) as f:
        record = json.loads(f.readline())
    record["top_k"] = record["top_k"][:5]
    print()
    print(format_sample(dataset["test"][record["row"]], record, len(dataset["item_info"]) - 1, WINDOW_SIZE))


def main(argv=None):
    args = parse_args(argv)
    python = sys.executable
    run([python, "preprocess.py", "--category", CATEGORY, "--data_root_dir", os.path.join("data", "sample")])
    note = bf16_note(args.float32)
    if note:
        print(note, flush=True)
    run([python, "train.py", *train_flags(args, bf16=not args.float32)])
    output_dir = os.path.join(ROOT, args.output_dir)
    before, after = before_and_after(output_dir)
    print_table(before, after)
    print_example(output_dir)
    print(f"\nTraining curves: {os.path.join(args.output_dir, CURVES_FILE)}")


if __name__ == "__main__":
    run_cli(main, interrupt_on_sigterm=False)  # `run` passes SIGTERM on to the step, which says it stopped
