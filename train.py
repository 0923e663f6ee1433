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
import glob
import os
import shutil
import socket
import sys
import time

# errors.py before the libraries: its excepthook makes Ctrl-C while they import one line
from errors import UserError, launched, one_line, one_line_parser_errors, run_cli, write_json

import torch
from transformers import AutoModelForCausalLM, EarlyStoppingCallback, HfArgumentParser, set_seed

from curves import CURVES_FILE, plot_training_curves
from dataset import load_dataset_dir
from model import (add_lora, check_layer_types, check_lora_targets, check_weights, load_backbone,
                   load_backbone_config, load_failure)
from paths import resolve_model
from rollouts import check_attention_interface
from run_folder import (RUN_RECORD, RecordInCheckpoints, check_output_dir, clear_earlier_run, earlier_run, in_use,
                        killed_run_logs, resumes_in_place, run_processes, run_record)
from trainer import RecPOConfig, RecPOTrainer, check_context_length, check_length_limits, check_train_size


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


def warn_about_build_locks():
    """DeepSpeed compiles some of its ops on first use (on CPUs, its shared-memory collectives), under
    a lock file that a build stopped midway (kill, Ctrl-C) leaves behind: every later run would wait
    on it silently, for ever."""
    from torch.utils.cpp_extension import get_default_build_root

    given = os.environ.get("TORCH_EXTENSIONS_DIR")  # else torch builds in <root>/py311_cu128/<op>/, say
    pattern = (os.path.join(glob.escape(given), "*", "lock") if given else
               os.path.join(glob.escape(get_default_build_root()), "*", "*", "lock"))
    for lock in sorted(glob.glob(pattern)):
        try:
            minutes = (time.time() - os.path.getmtime(lock)) / 60
        except OSError:  # the build finished meanwhile
            continue
        print(f"warning: {lock} is {minutes:.0f} min old: another run is building that DeepSpeed op, or a build "
              "was stopped midway and left it — if training then waits with no output, stop it, delete that file "
              "and start again", file=sys.stderr)


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
    (on a weightless skeleton). The embedded default is converted on its first use, weights and all.
    Returns its tokenizer."""
    path, model_config, tokenizer = load_backbone_config(config.model)
    check_weights(path)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except ValueError as e:  # a config that is not a causal LM's
        raise UserError(f"model {config.model!r} is not a causal language model ({one_line(e)}) — point --model "
                        "at a decoder-only backbone") from e
    except AssertionError as e:  # a config.json that builds no model (vocab_size 10)
        raise load_failure(config.model, path, e) from e
    check_lora_targets(skeleton, config.lora_targets)
    check_attention_interface(skeleton)
    check_layer_types(model_config)
    check_context_length(config, model_config)
    return tokenizer


def final_metrics(trainer: RecPOTrainer) -> dict:
    """Metrics of the model being saved: the evaluation already logged for its step, else a new one."""
    state = trainer.state
    step = state.global_step
    if trainer.args.load_best_model_at_end and state.best_global_step:
        step = state.best_global_step
    logged = [entry for entry in state.log_history
              if entry.get("step") == step and any(key.startswith("eval_test_") for key in entry)]
    if logged:  # greedy evaluation is deterministic: running it again would repeat the same numbers
        return {key: value for key, value in logged[-1].items() if key.startswith("eval_")}
    return trainer.evaluate()


def check_run(config: RecPOConfig, cpu_fallback: bool = False) -> None:
    """--check_only (launch_train.sh runs it before starting the processes): what would refuse the
    run, without loading weights or writing anything (but the embedded default's first conversion)."""
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
    if config.deepspeed and config.local_process_index == 0:
        warn_about_build_locks()
    trainer = build_trainer(config)
    with in_use(config.output_dir, holder=trainer.is_world_process_zero()):  # before anything is replaced
        return train_and_save(trainer, config, resume, argv)


def train_and_save(trainer: RecPOTrainer, config: RecPOConfig, resume: str | None, argv: list[str]) -> dict:
    """The run: the earlier one replaced (--overwrite_output_dir), training, then the final adapter,
    state, metrics, run record and curves in --output_dir."""
    if trainer.is_world_process_zero():  # once the run is sure to start
        warn_about_cpu(argv)
        note_unused_gpus(config.world_size)
    replaces = config.overwrite_output_dir and not resumes_in_place(config, resume)
    if trainer.is_world_process_zero() and replaces and (earlier_run(config.output_dir)
                                                         or killed_run_logs(config.output_dir)):
        clear_earlier_run(config.output_dir)
    record = run_record(config, trainer.category, list(trainer.item_titles.values()))
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
            plot_training_curves(trainer.state.log_history, os.path.join(config.output_dir, CURVES_FILE))
    except Exception as e:
        full_disk = full_disk_error(e, config.output_dir, trained)
        if full_disk is None:
            raise
        raise full_disk from e
    trainer.accelerator.end_training()
    return metrics


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], interrupt_on_sigterm=not launched())
