"""Train an R²ec model with RecPO: parse flags → load data and backbone → train → save → evaluate.

Single process (GPU, or CPU when no GPU is found; `--deepspeed ds_config.json` works here too):
    python train.py --dataset_dir data/Musical_Instruments_0_2022-10-2023-10 --model gemma
Three processes with DeepSpeed ZeRO-2 (launch_train.sh runs this, with its checks and settings):
    accelerate launch --multi_gpu --num_processes 3 train.py --deepspeed ds_config.json --dataset_dir ... --model qwen
`python train.py --help` lists every flag; the released launcher's spellings (`--train_batch_size`,
`--eval_batch_size`) are accepted too.
"""
import argparse
import errno
import fnmatch
import glob
import os
import re
import shutil
import socket
import sys
import zipfile

import torch
from transformers import AutoModelForCausalLM, EarlyStoppingCallback, HfArgumentParser, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from curves import plot_training_curves
from dataset import load_dataset_dir
from errors import (UserError, folder_problem, missing_path, one_line, one_line_parser_errors, read_json, run_cli,
                    write_json)
from model import add_lora, check_lora_targets, check_weights, load_backbone, load_backbone_config
from paths import resolve_model
from trainer import RecPOConfig, RecPOTrainer, check_length_limits, check_train_size

CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")  # the folders Trainer saves
RUN_RECORD = "r2ec_run.json"  # what recommend.py needs: in the output folder and in every checkpoint
RUN_SETTINGS = ("window_size", "max_new_tokens", "reasoning", "similarity_type", "tau", "max_prompt_tokens",
                "max_item_tokens", "bf16")
METHOD_SETTINGS = ("reasoning", "similarity_type", "tau")  # of RUN_SETTINGS, what a resume must keep
RUN_OUTPUTS = ("checkpoint-*", "runs", "reasoning", RUN_RECORD, "trainer_state.json", "*_results.json",
               "training_args.bin", "training_curves.png", "adapter_*", "README.md", "tokenizer*", "*.jinja",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "global_step*", "latest", "zero_to_fp32.py", "emissions.csv")  # what a run writes, ZeRO-3's too
WRITTEN_BEFORE_A_SAVE = ("runs", "reasoning")  # a run killed before its first checkpoint leaves only these
OTHER_CONTENT = ("config.json", "*.safetensors", "dataset_dict.json", "preprocess.json", ".git", "*.py")  # not a run's


def falls_back_to_cpu(argv: list[str]) -> bool:
    """No GPU is visible and --use_cpu is not given: the run goes to the CPU, with a warning."""
    return not torch.cuda.is_available() and not any(arg.startswith("--use_cpu") for arg in argv)


def warn_about_cpu(argv: list[str]):
    if falls_back_to_cpu(argv):
        print("warning: no GPU visible — training will run on the CPU, which takes days at full scale; "
              "check CUDA_VISIBLE_DEVICES and the CUDA install (--use_cpu True says it is meant)", file=sys.stderr)


def note_unused_gpus(processes: int):
    """A single process trains on one GPU (RecPOConfig.n_gpu): say so when more are visible."""
    if processes == 1 and torch.cuda.device_count() > 1:
        print(f"note: {torch.cuda.device_count()} GPUs are visible and a single process trains on the first — "
              f"NUM_PROCESSES={torch.cuda.device_count()} bash launch_train.sh trains on all of them", file=sys.stderr)


def parse_config(argv: list[str]) -> RecPOConfig:
    """Flags -> RecPOConfig, on the CPU when no GPU is found."""
    if falls_back_to_cpu(argv):
        argv = [*argv, "--use_cpu", "True"]  # the Trainer (and DeepSpeed through it) needs this without a GPU
    parser = one_line_parser_errors(HfArgumentParser(RecPOConfig), "python train.py --help")
    for action in parser._actions:  # HfArgumentParser gives --no_bf16 the help (and default) of --bf16
        if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
            action.help, action.default = f"Turn --{action.dest} off.", argparse.SUPPRESS
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UserError(f"unknown argument(s) {' '.join(unknown)} — python train.py --help lists the flags")
    return config


def free_port() -> str:
    """A port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def set_single_process_rendezvous():
    """Started without a launcher (python train.py, or accelerate launch with one process),
    DeepSpeed would look for MPI to find its peers: tell it it is alone, on a free port. Under
    torchrun-style launchers (RANK) or MPI (mpirun, srun --mpi) it finds them itself."""
    if {"RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"} & set(os.environ):
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())


def check_output_dir(config: RecPOConfig) -> str | None:
    """Fail before any work when the run's folder cannot be written, holds another run, or a
    resume has nothing whole to read; returns the checkpoint folder to resume from (None: a
    fresh run)."""
    folder = os.path.abspath(config.output_dir)
    problem = folder_problem(folder)
    if problem:
        raise UserError(f"--output_dir {config.output_dir} {problem} — pass a folder you can write to")
    if is_checkpoint(folder):
        raise UserError(f"--output_dir {config.output_dir} is a checkpoint of the run in {os.path.dirname(folder)} — "
                        "pass that folder as --output_dir with --resume_from_checkpoint last to continue the run, "
                        "or pick another --output_dir")
    resume = config.resume_from_checkpoint
    if resume in ("last", "latest", "True", "true"):
        resume = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        if resume is None:
            raise UserError(f"no checkpoint-* folder in {config.output_dir!r} to resume from — drop "
                            "--resume_from_checkpoint or pass a checkpoint folder")
    elif resume is not None and not os.path.exists(resume):
        raise UserError(f"--resume_from_checkpoint {missing_path(resume)} does not exist — pass a checkpoint-* folder "
                        "of a run, or 'last' for the newest one in --output_dir")
    elif resume is not None and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume!r} is a file — pass the checkpoint-* folder that holds it")
    elif resume is not None and not CHECKPOINT_NAME.fullmatch(folder_name(resume)):
        raise UserError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (checkpoint-N) — pass "
                        "a checkpoint-* folder or 'last'")
    if resume is not None:
        check_checkpoint(resume, config)
    if not resumes_in_place(config, resume):
        check_no_clash(folder, config.output_dir)
    if not resumes_in_place(config, resume) and earlier_run(folder) and not config.overwrite_output_dir:
        raise UserError(f"--output_dir {config.output_dir} holds an earlier run — continue it with "
                        "--resume_from_checkpoint last, pick another --output_dir, or pass "
                        "--overwrite_output_dir True to replace it")
    return resume


def is_checkpoint(folder: str) -> bool:
    """Whether `folder` is a checkpoint-N folder a run saved."""
    return (CHECKPOINT_NAME.fullmatch(folder_name(folder)) is not None
            and os.path.isfile(os.path.join(folder, "trainer_state.json")))


def folder_name(path: str) -> str:
    """The last part of a folder path or hub id, trailing slash or not."""
    return os.path.basename(os.path.normpath(path))


def resumes_in_place(config: RecPOConfig, resume: str | None) -> bool:
    """Whether the run continues from a checkpoint of its own --output_dir (not another run's)."""
    return resume is not None and os.path.dirname(os.path.realpath(resume)) == os.path.realpath(config.output_dir)


def checkpoint_folders(folder: str) -> list[str]:
    return glob.glob(os.path.join(glob.escape(folder), "checkpoint-*"))  # a folder name may hold [ ] * ?


def is_run_output(path: str) -> bool:
    """Whether a run writes an entry of this name at its folder's top level (hidden ones aside)."""
    name = os.path.basename(os.path.normpath(path))
    return not name.startswith(".") and any(fnmatch.fnmatch(name, pattern) for pattern in RUN_OUTPUTS)


def clashing_files(folder: str) -> list[str]:
    """Entries of `folder` that a run would overwrite or mix with: a model, a dataset or code
    (`--output_dir .` had PEFT's model card written over the repository's README.md), and, where
    no earlier run wrote them, the names a run writes. Other files (a log, recommend.py's output)
    are left alone, and kept when an earlier run is replaced."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    earlier = earlier_run(folder)
    other_content = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in OTHER_CONTENT)
                     and not is_run_output(name)]
    unclaimed_run_names = [] if earlier else [name for name in names
                                               if is_run_output(name) and name not in WRITTEN_BEFORE_A_SAVE]
    return sorted(other_content + unclaimed_run_names)


def check_no_clash(folder: str, given: str):
    """A fresh run (train.py or the quick start) must not go where `clashing_files` finds anything."""
    clashing = clashing_files(folder)
    if clashing:
        raise UserError(f"--output_dir {given} holds {', '.join(clashing[:3])}{', ...' if len(clashing) > 3 else ''}, "
                        "not an earlier run's, which the run would overwrite or mix with — pick a new or empty folder")


def clear_earlier_run(folder: str):
    """A fresh run removes what an earlier run wrote in its folder (the names of RUN_OUTPUTS; other
    files stay): the run --overwrite_output_dir replaces, or the logs of one killed before its
    first save. So `last`, checkpoint rotation, curves.py, TensorBoard and recommend.py (which
    refuses a folder without a run record until the new run completes it) never see a mix of two
    runs. Called once the new run is built, so a bad flag or backbone leaves the earlier run whole."""
    for path in [os.path.join(folder, name) for name in os.listdir(folder) if is_run_output(name)]:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as e:
            raise UserError(f"--overwrite_output_dir: cannot remove {path} of the earlier run ({one_line(e)}) — "
                            "remove it yourself or pick another --output_dir") from e


def earlier_run(folder: str) -> bool:
    saved = [os.path.join(folder, name) for name in ("trainer_state.json", RUN_RECORD)]
    return any(map(os.path.exists, saved)) or bool(checkpoint_folders(folder))


def check_checkpoint(checkpoint: str, config: RecPOConfig):
    """The checkpoint's files are whole and its LoRA shape, method settings, data order and backbone
    are this run's, so resuming cannot fail halfway, switch method or retrain samples."""
    fix = "resume from another checkpoint-* folder, or start afresh in another --output_dir"
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        raise UserError(f"{checkpoint} is incomplete (no trainer_state.json: its save was cut short) — delete it "
                        "and resume from the checkpoint before it")
    step = read_json(os.path.join(checkpoint, "trainer_state.json"), fix).get("global_step", 0)
    if not isinstance(step, int):
        raise UserError(f"{checkpoint}/trainer_state.json's global_step {step!r} is not a step number — {fix}")
    if 0 < config.max_steps <= step:  # the Trainer would still train one more step
        raise UserError(f"{checkpoint} has already trained {step} steps, --max_steps {config.max_steps} — "
                        "raise --max_steps to continue")
    adapter = read_json(os.path.join(checkpoint, "adapter_config.json"), fix)
    saved_and_given = {  # flag: (the checkpoint's value, this run's)
        "lora_r": (adapter.get("r"), config.lora_r),
        "lora_alpha": (adapter.get("lora_alpha"), config.lora_alpha),
        "lora_target_modules": (",".join(sorted(adapter.get("target_modules") or [])), ",".join(sorted(config.lora_targets))),
    }
    record_path = os.path.join(checkpoint, RUN_RECORD)
    run_folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.isfile(record_path):
        record = read_json(record_path, fix)
    elif any(os.path.isfile(os.path.join(folder, RUN_RECORD)) for folder in [run_folder, *checkpoint_folders(run_folder)]):
        raise UserError(f"{checkpoint} is incomplete (no {RUN_RECORD}, which its run writes last into each "
                        "checkpoint: its save was cut short) — delete it and resume from the checkpoint before it")
    else:
        record = {}  # a checkpoint of an older version, whose runs wrote no record
    for flag in METHOD_SETTINGS:  # a resume must not switch method halfway (length limits may change)
        if flag in record:
            saved_and_given[flag] = (record[flag], getattr(config, flag))
    for flag, (saved, given) in saved_and_given.items():
        if saved != given:
            raise UserError(f"{checkpoint} was trained with --{flag} {saved}, not {given} — resume with --{flag} {saved}")
    saved_order, order = record.get("data_order"), data_order(config)
    if isinstance(saved_order, dict) and saved_order != order and not config.ignore_data_skip:
        changed = ", ".join(f"{key} {saved_order.get(key)}, not {value}" for key, value in order.items()
                            if saved_order.get(key) != value)
        raise UserError(f"{checkpoint} was trained with {changed}: the resume would skip the wrong samples of its epoch "
                        "— resume with the same --train_batch_size × --gradient_accumulation_steps × processes, "
                        "--num_iterations and --seed, or pass --ignore_data_skip True to start the epoch's order afresh")
    trained_on_data = record.get("dataset_dir")
    moved_or_other = isinstance(trained_on_data, str) and config.dataset_dir
    if moved_or_other and folder_name(trained_on_data) != folder_name(config.dataset_dir):
        raise UserError(f"{checkpoint} was trained on the dataset {trained_on_data}, not {config.dataset_dir} — resume "
                        "with that --dataset_dir (moved: keep its folder name)")
    trained_on, backbone = adapter.get("base_model_name_or_path"), resolve_model(config.model)
    if trained_on and folder_name(trained_on) != folder_name(backbone):  # the backbone may sit elsewhere now
        raise UserError(f"{checkpoint} was trained on {trained_on}, not {backbone} — resume with that --model")
    try:
        from safetensors import safe_open

        with safe_open(os.path.join(checkpoint, "adapter_model.safetensors"), "pt"):
            pass
    except Exception as e:  # missing, truncated or not safetensors: the library raises several kinds
        raise UserError(f"{checkpoint}'s adapter weights cannot be read ({one_line(e)}) — {fix}") from e
    # Without its optimizer and scheduler state Trainer would resume with fresh ones, silently.
    optimizer = os.path.join(checkpoint, "optimizer.pt")
    deepspeed_state = bool(glob.glob(os.path.join(glob.escape(checkpoint), "global_step*")))  # DeepSpeed's own folder
    if deepspeed_state and not config.deepspeed:
        raise UserError(f"{checkpoint} was saved under DeepSpeed — resume with --deepspeed ds_config.json "
                        "(launch_train.sh passes it)")
    if config.deepspeed and not deepspeed_state and os.path.exists(optimizer):
        raise UserError(f"{checkpoint} was saved without DeepSpeed — resume without --deepspeed")
    if config.deepspeed:
        missing = [] if deepspeed_state else ["global_step*"]
    else:
        missing = [name for name in ("optimizer.pt", "scheduler.pt") if not os.path.exists(os.path.join(checkpoint, name))]
    if missing:
        raise UserError(f"{checkpoint} lacks {', '.join(missing)}, the optimizer and learning-rate state — {fix}")
    if os.path.exists(optimizer) and not zipfile.is_zipfile(optimizer):
        raise UserError(f"{optimizer} is truncated or corrupt — {fix}")


def run_processes(config: RecPOConfig) -> int:
    """The run's processes: this launch's, or the ones launch_train.sh starts after its --check_only."""
    return int(os.environ.get("R2EC_PROCESSES", config.world_size))


def data_order(config: RecPOConfig) -> dict:
    """What decides which samples each step trains: a resume skips the samples of the steps done."""
    samples_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * run_processes(config)
    return {"samples_per_step": samples_per_step, "num_iterations": config.num_iterations, "seed": config.seed}


def run_record(config: RecPOConfig, category: str) -> dict:
    """The run record recommend.py rebuilds a run's inference from: backbone, dataset, prompt and score
    settings, precision."""
    model_path = resolve_model(config.model)
    return {"model": config.model, "model_path": os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
            "dataset_dir": os.path.abspath(config.dataset_dir), "category": category,
            **{key: getattr(config, key) for key in RUN_SETTINGS}, "data_order": data_order(config)}


class RecordInCheckpoints(TrainerCallback):
    """Writes the run record into every checkpoint, so each one can be served without the run finishing."""

    def __init__(self, record: dict):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # process 0, or each node's first with --save_on_each_node
            write_json(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", RUN_RECORD), self.record)


def build_trainer(config: RecPOConfig) -> RecPOTrainer:
    """Data, backbone with LoRA, and the RecPO trainer for a parsed config."""
    set_seed(config.seed)
    dataset, category = load_dataset_dir(config.dataset_dir, config.dataset_category)
    config.set_intervals(len(dataset["train"]))
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model, tokenizer = load_backbone(config.model, dtype=dtype)
    model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     target_modules=config.lora_targets)
    evaluates = config.eval_strategy != "no"
    callbacks = [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)] if evaluates else []
    return RecPOTrainer(model, config, tokenizer, dataset, category, callbacks=callbacks)


def check_gpus_per_machine(processes: int, cpu_fallback: bool = False):
    """Each of a machine's processes needs a GPU of its own (NCCL refuses to share one). Several
    processes with no GPU at all is a CUDA setup gone wrong, unless --use_cpu says the CPU is meant
    (`cpu_fallback`: no GPU and no --use_cpu)."""
    visible = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
    if cpu_fallback and processes > 1:
        raise UserError(f"NUM_PROCESSES={processes} but no GPU visible ({visible}) — check CUDA_VISIBLE_DEVICES and "
                        "the CUDA install, or pass --use_cpu True to train on the CPU")
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise UserError(f"NUM_PROCESSES={processes} but {torch.cuda.device_count()} GPU(s) visible ({visible}) — "
                        "start at most one process per GPU")


def check_backbone(config: RecPOConfig):
    """What loading the backbone would refuse, without loading its weights (for --check_only): its
    folder or hub id, tokenizer and chat template, the weight files' headers, and the LoRA targets
    (on a weightless skeleton).
    Returns its tokenizer."""
    path, model_config, tokenizer = load_backbone_config(config.model)
    check_weights(path)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except ValueError as e:  # a config that is not a causal LM's
        raise UserError(f"model {config.model!r} is not a causal language model ({one_line(e)}) — point --model "
                        "at a decoder-only backbone") from e
    check_lora_targets(skeleton, config.lora_targets)
    return tokenizer


def final_metrics(trainer: RecPOTrainer) -> dict:
    """Metrics of the model being saved: the evaluation already logged for its step, else a new one."""
    state = trainer.state
    step = state.global_step
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        step = int(state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[1])
    logged = [entry for entry in state.log_history
              if entry.get("step") == step and any(key.startswith("eval_test_") for key in entry)]
    if logged:  # greedy evaluation is deterministic: running it again would repeat the same numbers
        return {key: value for key, value in logged[-1].items() if key.startswith("eval_")}
    return trainer.evaluate()


def check_run(config: RecPOConfig, cpu_fallback: bool = False) -> None:
    """--check_only (launch_train.sh runs it before starting the processes): what would refuse the
    run, without loading weights or writing anything."""
    dataset, category = load_dataset_dir(config.dataset_dir, config.dataset_category)
    check_train_size(len(dataset["train"]), config.per_device_train_batch_size * run_processes(config))
    check_gpus_per_machine(int(os.environ.get("R2EC_PROCESSES_PER_MACHINE", "1")), cpu_fallback)
    check_length_limits(config, check_backbone(config), dataset, category)
    print(f"ok: flags, {config.output_dir}, {config.dataset_dir} ({category}) and model {resolve_model(config.model)}")


def full_disk_error(error: Exception, output_dir: str, trained: bool) -> UserError | None:
    """The one line for a write that failed for want of space; None for any other failure.

    ENOSPC names it, also inside the tokenizers library's plain Exception; torch.save hides it in
    a RuntimeError ("unexpected pos"), so a nearly full disk under the output folder counts too.
    """
    says_so = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)
    try:
        output_disk_full = shutil.disk_usage(output_dir).free < 2**20
    except OSError:
        output_disk_full = False
    if not (says_so or output_disk_full):
        return None
    where = f"the disk of {output_dir}" if output_disk_full else "a disk (a full /dev/shm or cache folder is common)"
    then = ("serve its last checkpoint-* with recommend.py (training finished; the final adapter and results were "
            "not written)" if trained else
            "resume with --resume_from_checkpoint last (a checkpoint cut short is then named: delete it)")
    return UserError(f"no space left on {where} ({one_line(error)}) — free some space, then {then}")


def main(argv: list[str]):
    if any(arg.startswith("--deepspeed") for arg in argv):
        set_single_process_rendezvous()  # before parsing, which sets the processes up
    config = parse_config(argv)
    resume = check_output_dir(config)
    if config.check_only:
        check_run(config, falls_back_to_cpu(argv))
        if "R2EC_PROCESSES" not in os.environ:  # launch_train.sh's check: its training process warns once
            warn_about_cpu(argv)
        return
    if resume is not None:
        config.eval_on_start = False  # the checkpoint's model was evaluated before it was saved
    trainer = build_trainer(config)
    if trainer.is_world_process_zero():  # once the run is sure to start
        warn_about_cpu(argv)
        note_unused_gpus(config.world_size)
    if trainer.is_world_process_zero() and not resumes_in_place(config, resume) and os.path.isdir(config.output_dir):
        clear_earlier_run(config.output_dir)  # check_output_dir let only an overwritten run or a killed one's logs be
    record = run_record(config, trainer.category)
    trainer.add_callback(RecordInCheckpoints(record))  # recommend.py also reads a killed run's checkpoints
    trainer.accelerator.wait_for_everyone()  # on every process: the others may find the folder cleared already
    trained = False
    try:
        trainer.train(resume_from_checkpoint=resume)
        trained = True
        trainer.save_model(config.output_dir)
        metrics = final_metrics(trainer)
        trainer.save_state()  # trainer_state.json with the whole log history, next to the adapter
        if trainer.is_world_process_zero():
            trainer.save_metrics("final", metrics)
            write_json(os.path.join(config.output_dir, RUN_RECORD), record)
            plot_training_curves(trainer.state.log_history, os.path.join(config.output_dir, "training_curves.png"))
    except Exception as e:
        full_disk = full_disk_error(e, config.output_dir, trained)
        if full_disk is None:
            raise
        raise full_disk from e
    trainer.accelerator.end_training()
    return metrics


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], interrupt_on_sigterm=False)
