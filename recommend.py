"""Recommend with a trained R²ec model: greedy reasoning, then the full ranking of every item.

Per sample, it prints the user's history, the model's reasoning and the top-K items with their
scores, `*` marking the true next item, and that item's rank:
    python recommend.py --output_dir outputs/r2ec --split test --samples 0 3 7
    python recommend.py --output_dir outputs/quickstart --split valid --user_id AF92T9L7L0LFJE70CS369B7REYQ4 --top_k 20
The metric table of a split (NDCG/Hit@5/10/20, mean reasoning length), as training evaluates it:
    python recommend.py --output_dir outputs/r2ec --split test --evaluate --max_samples 500
Any of them can also write one JSON line per sample (row, split, user_id, target_item_id,
target_rank (null: bought before, never recommended), reasoning, reasoning_tokens, top_k: [{item_id,
title, score}]), the format of the
reasoning files training saves with each evaluation:
    python recommend.py --output_dir outputs/r2ec --split test --evaluate --output test_ranks.jsonl
`--output_dir` is a train.py output folder (a `checkpoint-*` folder inside one works too);
`--device auto|cpu|cuda`; `--dtype` (default: the run's precision: bf16 weights under bf16 autocast,
as training evaluates, or float32); `--dataset_dir` overrides the dataset the run was trained on.
Tests: `pytest tests/test_recommend.py`.

The work is RecPOTrainer's own steps (`recommend_rows`, `masked_scores`, the item table), run
by a trainer built for inference, so the prompts, the user state and the masking are exactly
those of training and evaluation.
"""
import argparse
import contextlib
import dataclasses
import glob
import os
import sys
import textwrap
import warnings

# errors.py before the libraries: its excepthook makes Ctrl-C while they import one line
from errors import (UserError, check_int64, check_not_blank, check_output_file, missing_path, one_line,
                    one_line_parser_errors, read_json, run_cli, write_jsonl)

import torch

from dataset import (SAMPLE_SPLITS, catalogue_digest, catalogue_titles, load_dataset_dir, preprocess_record,
                     preprocessed_anew)
from metrics import KS, RANKING_METRICS, metric_name, split_metrics
from model import LOAD_ERRORS, check_tokenizer, load_backbone
from paths import resolve_model
from run_folder import (RUN_RECORD, RUN_SETTINGS, checkpoint_folders, checkpoint_step, folder_name, in_a_run,
                        killed_run_logs)
from trainer import RecPOConfig, RecPOTrainer, check_length_limits

RUN_KEYS = ("model", "dataset_dir", "category")  # needed in r2ec_run.json
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SERVED_FILES = (RUN_RECORD, "adapter_*", "tokenizer*", "*.jinja", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt")  # what serving reads of a run's folder
RECORDED_FIELDS = {"model", "dataset_dir", *RUN_SETTINGS}  # what r2ec_run.json gives RecPOConfig (not deepspeed, ...)
SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(RecPOConfig) if f.name in RECORDED_FIELDS}


# ----------------------------------------------------------------------------------------------
# Loading a trained run


def read_run(folder: str) -> dict:
    """The run's r2ec_run.json for `folder` (a finished run or one of its checkpoints; `run_record_path`)."""
    if not os.path.isdir(folder):
        state = "is a file" if os.path.exists(folder) else "does not exist"
        raise UserError(f"--output_dir {missing_path(folder)} {state} — pass the folder of a train.py run")
    checkpoints = sorted((c for c in checkpoint_folders(folder) if checkpoint_step(c) is not None), key=checkpoint_step)
    if checkpoints and not is_servable(folder):
        complete = [c for c in checkpoints if is_servable(c)]
        if not complete:
            raise UserError(f"{folder!r} holds no final model and its checkpoints were cut short ("
                            f"{', '.join(map(folder_name, checkpoints[-3:]))}) — re-run train.py")
        raise UserError(f"{folder!r} holds no final model (the run stopped before its end, or its final save was "
                        f"cut short) — pass its latest complete checkpoint: --output_dir {complete[-1]}")
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        if killed_run_logs(folder):
            raise UserError(f"{folder!r} holds only the logs of a run that has saved no checkpoint yet (still "
                            "running, or stopped before its first save) — wait for its first checkpoint (see "
                            "--save_steps), or pass another run")
        raise UserError(f"{folder!r} holds no LoRA adapter (adapter_config.json) — pass a train.py output "
                        "folder or one of its checkpoint-* folders")
    if not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        raise UserError(f"{folder!r} lacks the adapter's weights (adapter_model.safetensors; its save was cut "
                        "short?) — pass another checkpoint-* folder of the run, or re-run train.py")
    served = [path for pattern in SERVED_FILES
              for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))]
    unreadable = [path for path in served if not os.access(path, os.R_OK)]
    if unreadable:
        raise UserError(f"{unreadable[0]} is not readable by you (permission denied) — ask the run's owner to make "
                        f"its files readable: chmod -R a+rX {folder}")
    record = run_record_path(folder)
    if record is None:
        raise UserError(f"no {RUN_RECORD} in {folder!r} or its parent — train.py writes it into each checkpoint "
                        "and the finished run's folder: pass one of those")
    return parse_run_file(record)


def run_record_path(folder: str) -> str | None:
    """The run record in `folder`, else in its parent (a checkpoint of a version before 2026-11-29,
    which wrote the record into the run's folder at the start); None: neither holds one."""
    for place in (folder, os.path.dirname(os.path.abspath(folder))):
        path = os.path.join(place, RUN_RECORD)
        if os.path.isfile(path):
            return path
    return None


def is_servable(folder: str) -> bool:
    """Whether a finished run or a checkpoint holds what serving reads (a save cut short lacks some)."""
    adapter = all(os.path.isfile(os.path.join(folder, name))
                  for name in ("adapter_config.json", "adapter_model.safetensors"))
    return adapter and run_record_path(folder) is not None


def parse_run_file(path: str) -> dict:
    """r2ec_run.json, checked: a JSON object with the keys recommend needs, as text."""
    fix = "re-run train.py for this run or restore the file"
    run = read_json(path, fix)
    bad = [key for key in RUN_KEYS if not isinstance(run.get(key), str) or not run[key]]
    if bad:
        raise UserError(f"{path!r} has no {', '.join(bad)} (or not as text) — {fix}")
    wrong = [f"{key} {run[key]!r} is not {kind.__name__}" for key, kind in SETTING_TYPES.items()
             if key in run and not fits(run[key], kind)]
    if wrong:
        raise UserError(f"{path!r}: {', '.join(wrong)} — {fix}")
    return run


def fits(value, kind: type) -> bool:
    """JSON value of a setting of type `kind`: an int is a float too, a bool is no int."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def base_model_path(run: dict) -> str:
    """The backbone the run was trained from: its `model` name as paths.py resolves it now, else the
    folder recorded at training time (a key whose path was edited since, or a moved cache)."""
    try:
        return resolve_model(run["model"])
    except UserError as e:
        if isinstance(run.get("model_path"), str) and os.path.isdir(run["model_path"]):
            return run["model_path"]
        raise UserError(f"{e} (the run's recorded model_path {run.get('model_path')!r} is gone too)") from e


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no GPU is visible — use --device cpu or auto")
    return name


def precision(args, run: dict, device: str) -> tuple[torch.dtype, bool]:
    """(the weights' dtype, whether to run under bf16 autocast): the run's precision unless --dtype
    says otherwise. A bf16 run evaluated under accelerate's bf16 autocast, its LoRA weights in
    float32; a run recorded before its precision was: bf16 on a GPU, float32 on the CPU."""
    trained_bf16 = run.get("bf16")
    if args.dtype != "auto":
        dtype = DTYPES[args.dtype]
    elif trained_bf16 is not None:
        dtype = torch.bfloat16 if trained_bf16 else torch.float32
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return dtype, dtype == torch.bfloat16 and trained_bf16 is True


def inference_config(args, run: dict, device: str, autocast: bool) -> RecPOConfig:
    """RecPOConfig for inference: the run's prompt and scoring settings, no training, no logging."""
    recorded = {key: value for key, value in run.items() if key in RECORDED_FIELDS}
    recorded["bf16"] = autocast  # the run's, unless --dtype chose other weights
    if args.dataset_dir:
        recorded["dataset_dir"] = args.dataset_dir  # the flag wins over the run's dataset
    try:
        return RecPOConfig(
            **recorded, output_dir=args.output_dir, dataset_category=run["category"], use_cpu=device == "cpu",
            report_to="none", eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
            eval_on_start=False, gradient_checkpointing=False, per_device_eval_batch_size=args.batch_size,
        )
    except (TypeError, UserError) as e:  # a value RecPOConfig refuses, e.g. "window_size": 0
        raise UserError(f"r2ec_run.json in {args.output_dir!r} holds a bad setting ({one_line(e)}) — "
                        "re-run train.py for this run or restore the file") from e


def load_recommender(folder: str, run: dict, config: RecPOConfig, dataset, category: str, dtype) -> RecPOTrainer:
    """Base model + the run's LoRA adapter and tokenizer, wrapped in a RecPOTrainer whose item table
    is encoded. The trainer is never trained: it supplies the rollout, scoring and ranking steps."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    damaged = f"re-run train.py for {folder!r} or restore its files"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except LOAD_ERRORS as e:
        raise UserError(f"the tokenizer in {folder!r} cannot be loaded ({one_line(e)}) — {damaged}") from e
    check_tokenizer(tokenizer, repr(folder), damaged)
    tokenizer.padding_side = "left"  # not saved with the tokenizer; prompts are left-padded
    check_length_limits(config, tokenizer, dataset, category, setting="r2ec_run.json's {}")  # before the model loads
    path = base_model_path(run)
    trained_on = run.get("model_path")
    if isinstance(trained_on, str) and folder_name(trained_on) != folder_name(path):  # it may sit elsewhere now
        raise UserError(f"the adapter in {folder!r} was trained on {trained_on!r}, but the run's model {run['model']!r} "
                        f"now resolves to {path!r} — point paths.py's model_names (or \"model\" in r2ec_run.json) back "
                        "at the backbone it was trained on, kept under its folder name")
    base, _ = load_backbone(path, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # named below, in one line
            model = PeftModel.from_pretrained(base, folder)  # inference mode: adapters frozen, dropout off
    except Exception as e:  # another backbone size, truncated weights, a config that is not JSON, ...
        if isinstance(e, RuntimeError) and "size mismatch" in str(e):
            raise UserError(f"the adapter in {folder!r} (trained on {run['model']!r}, {trained_on!r} then) does not fit "
                            f"{path!r} (size mismatch): that folder holds a backbone of another size now, or the "
                            "adapter_config.json was edited — point paths.py's model_names (or \"model\" in "
                            f"r2ec_run.json) back at the backbone it was trained on, or {damaged}") from e
        raise UserError(f"the adapter in {folder!r} cannot be loaded ({one_line(e)}) — {damaged}") from e
    missing = missing_adapter_weights(model, folder)
    if missing:
        raise UserError(f"the adapter in {folder!r} lacks {len(missing)} of its weights ({missing[0]}, ...; "
                        f"trained on another backbone than {path!r} holds now, saved from another LoRA setting, "
                        f"or cut short) — {damaged}")
    trainer = RecPOTrainer(model, config, tokenizer, dataset, category)  # moves the model to config.device
    trainer.model = trainer.accelerator.prepare_model(trainer.model, evaluation_mode=True)  # bf16 autocast, as trained
    trainer.refresh_item_table(trainer.model)
    return trainer


def missing_adapter_weights(model, folder: str) -> list[str]:
    """LoRA weights the model has and the folder's adapter_model.safetensors lacks (PEFT only
    warns, and would leave them at their initial values: an adapter that does nothing)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as weights:
        saved = set(weights.keys())
    return sorted(set(get_peft_model_state_dict(model)) - saved)


# ----------------------------------------------------------------------------------------------
# Recommending


def warn_about_another_dataset(run: dict, item_info, dataset_dir: str):
    """Any dataset can be served (items are encoded from their text); but another catalogue than the
    run's (its record's digest; runs before 2026-12-01 recorded none), or the run's dataset
    preprocessed anew since (its preprocess.json; recorded since 2026-12-02), is more often a
    mistake than a choice: say so."""
    titles = catalogue_titles(item_info)
    if run.get("catalogue") not in (None, catalogue_digest(titles)):
        print(f"warning: the dataset {dataset_dir!r} holds another catalogue ({len(titles) - 1} items, titles "
              f"not all the same) than the run was trained on ({run.get('items')} items) — fine if meant; else "
              "pass the dataset it was trained on as --dataset_dir", file=sys.stderr)
        return
    if folder_name(dataset_dir) == folder_name(run["dataset_dir"]):  # the same dataset, by its name
        changed = preprocessed_anew(run.get("preprocess"), preprocess_record(dataset_dir))
        if changed:
            print(f"warning: the dataset {dataset_dir!r} was preprocessed anew since the run trained on it "
                  f"({'; '.join(changed)}) — fine if meant; else rerun preprocess.py into it with the settings "
                  "of then", file=sys.stderr)


def pick_rows(split_data, split: str, args) -> list[int]:
    """Rows of the split to recommend for: --samples, --user_id's samples, --evaluate's first
    --max_samples, or row 0."""
    size = len(split_data)
    if args.evaluate:
        return list(range(size if args.max_samples is None else min(size, args.max_samples)))
    if args.user_id is not None:
        rows = [i for i, user in enumerate(split_data["user_id"]) if user == args.user_id]
        if not rows:
            examples = ", ".join(dict.fromkeys(split_data["user_id"][:3]))
            raise UserError(f"user {args.user_id!r} has no sample in the {split} split — users there look like "
                            f"{examples}; try another --split")
        return rows
    bad = [row for row in args.samples if not 0 <= row < size]
    if bad:
        raise UserError(f"--samples {' '.join(map(str, bad))}: the {split} split has {size} samples, "
                        f"rows 0 to {size - 1}")
    return args.samples


# ----------------------------------------------------------------------------------------------
# Printing


def format_sample(sample: dict, record: dict, num_items: int, window_size: int) -> str:
    """One sample's history as the prompt shows it (the last `window_size` items), reasoning and top-k."""
    shown = list(zip(sample["history_item_title"], sample["history_rating"]))[-window_size:]
    lines = [f"== {record['split']} row {record['row']} · user {record['user_id']} ==",
             f"history in the prompt ({len(shown)} of {len(sample['history_item_id'])} items, oldest first, "
             "rating out of 5):"]
    lines += [f"  ({float(rating):.1f}) {title}" for title, rating in shown]
    lines += ["reasoning:", textwrap.indent(record["reasoning"], "  "),
              f"top {len(record['top_k'])} (* = the true next item):"]
    lines += [f"  {'*' if item['item_id'] == record['target_item_id'] else ' '}{rank:>3}. {item['score']:9.3f}  "
              f"{item['title']} (item {item['item_id']})" for rank, item in enumerate(record["top_k"], 1)]
    if record["target_rank"] is None:  # bought again: masked like every history item
        place = "not ranked: bought before, and history items are never recommended (a miss in every metric)"
    else:
        place = f"rank {record['target_rank']} of {num_items}"
    lines.append(f"true next item: {sample['item_title']} (item {record['target_item_id']}), {place}")
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float], split: str, count: int) -> str:
    lines = [f"{split}: {count} samples, mean reasoning length {metrics['reasoning_length']:.1f} tokens",
             " " * 6 + "".join(f"{'@' + str(k):>9}" for k in KS)]
    for label in RANKING_METRICS:
        lines.append(f"{label:<6}" + "".join(f"{metrics[metric_name(label, k)]:9.4f}" for k in KS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description="Recommend with a trained R²ec model (see the file docstring).")
    one_line_parser_errors(parser, "python recommend.py --help")
    parser.add_argument("--output_dir", required=True, type=os.path.expanduser,
                        help="A train.py output folder (or a checkpoint-* in it).")
    parser.add_argument("--split", default="test", help=f"One of {', '.join(SAMPLE_SPLITS)}.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--samples", type=int, nargs="+", default=[0], help="Rows of the split (default: 0).")
    which.add_argument("--user_id", help="Every sample of this user in the split.")
    which.add_argument("--evaluate", action="store_true", help="Metric table over the split.")
    parser.add_argument("--max_samples", type=int, help="With --evaluate: only the first N samples.")
    parser.add_argument("--top_k", type=int, default=10, help="Items listed per sample.")
    parser.add_argument("--output", type=os.path.expanduser, help="Write one JSON line per sample to this file.")
    parser.add_argument("--dataset_dir", type=os.path.expanduser,
                        help="Dataset folder; default: the one the run was trained on.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="Default: the run's (bf16 under autocast, or float32).")
    parser.add_argument("--batch_size", type=int, default=32, help="Samples per greedy-generation batch.")
    args = parser.parse_args(argv)
    if args.split not in SAMPLE_SPLITS:  # checked here, not by argparse choices: one error line, not usage + line
        raise UserError(f"--split {args.split!r}: choose one of {', '.join(SAMPLE_SPLITS)}")
    for flag in ("top_k", "batch_size", "max_samples"):
        check_int64(f"--{flag}", getattr(args, flag))
    for flag in ("top_k", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.max_samples is not None and not args.evaluate:
        raise UserError(f"--max_samples {args.max_samples} only applies with --evaluate — add --evaluate, or "
                        "choose rows with --samples or --user_id")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max_samples {args.max_samples}: must be at least 1 (leave it out for the whole split)")
    for flag, what in (("output", "a file name"), ("dataset_dir", "a dataset folder")):
        check_not_blank(f"--{flag}", getattr(args, flag), f"pass {what}, or leave the flag out")
    if args.output is not None:
        check_output_file(args.output, "--output")  # here, not after minutes of inference
        if in_a_run(args.output):
            raise UserError(f"--output {args.output!r} is one of a run's own files — pick another name")
        if os.path.exists(args.output) and not args.output.endswith(".jsonl"):  # a dataset's or the repo's file
            raise UserError(f"--output {args.output!r} exists and is no .jsonl file, which recommend.py writes "
                            "— pick a new name or an earlier output (*.jsonl)")
    return args


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    run = read_run(args.output_dir)
    device = pick_device(args.device)
    dtype, autocast = precision(args, run, device)
    config = inference_config(args, run, device, autocast)
    if not args.dataset_dir and not os.path.isdir(config.dataset_dir):
        raise UserError(f"the run's dataset {config.dataset_dir!r} (in its {RUN_RECORD}) is gone — pass its new "
                        "place as --dataset_dir, or rerun preprocess.py with the run's settings")
    dataset, category = load_dataset_dir(config.dataset_dir, config.dataset_category)
    warn_about_another_dataset(run, dataset["item_info"], config.dataset_dir)
    split_data = dataset[args.split]
    rows = pick_rows(split_data, args.split, args)  # bad rows fail here, before the model loads

    with contextlib.redirect_stdout(sys.stderr):  # libraries' notices (DeepSpeed logs to stdout) stay out of the printout
        trainer = load_recommender(args.output_dir, run, config, dataset, category, dtype)
        records = trainer.recommend_rows(trainer.model, split_data, args.split, rows, args.top_k)
    if args.output:
        write_jsonl(args.output, records)  # before printing: a reader that stops early must not cost the file
    if args.evaluate:
        shown = format_metrics(split_metrics(records), args.split, len(records))
    else:
        num_items = len(dataset["item_info"]) - 1  # the pad item is no item
        shown = "\n\n".join(format_sample(split_data[r["row"]], r, num_items, config.window_size) for r in records)
    try:
        print(shown, flush=True)
    except BrokenPipeError:  # `| head` took what it wanted and closed the pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a second error at exit's flush
    return records


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
