"""train.py's trainer under `accelerate launch`, saving each process's LoRA weights before/after,
then the model into OUT_DIR/saved, counting DeepSpeed's copies of the state to host memory.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \
        tests/ds_train_worker.py OUT_DIR [--fault KIND] --deepspeed ds_config.json --dataset_dir ... [train.py flags]

`--fault` makes process 1 fail step 1 once: `oom_after_rollout` runs out of memory scoring its
rollouts (before any backward), `nan_second_micro_batch` gets a non-finite token loss in its second
micro-batch (after the first one's backward). Both must skip step 1 on every process.
"""
import os
import sys

import deepspeed.checkpoint.utils
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist_update_worker import exit_without_teardown  # noqa: E402
from train import build_trainer, parse_config  # noqa: E402

FAULTS = ("oom_after_rollout", "nan_second_micro_batch")


def inject(trainer, fault: str):
    """Process 1 fails step 1 once, as `fault` says."""
    if trainer.accelerator.process_index != 1:
        return
    rewards, token_loss, calls = trainer.rewards, trainer.token_loss, []

    def rewards_or_oom(*args):
        if trainer.state.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return rewards(*args)

    def token_loss_nan_once(*args, **kwargs):
        loss, clip_fraction = token_loss(*args, **kwargs)
        if trainer.state.global_step == 1:
            calls.append(1)
            if len(calls) == 2:
                loss = loss * float("nan")
        return loss, clip_fraction

    if fault == "oom_after_rollout":
        trainer.rewards = rewards_or_oom
    else:
        trainer.token_loss = token_loss_nan_once


def main(out_dir: str, argv: list[str]):
    fault = None
    if argv[:1] == ["--fault"]:
        fault, argv = argv[1], argv[2:]
        assert fault in FAULTS, fault
    trainer = build_trainer(parse_config(argv))
    if fault:
        inject(trainer, fault)
    lora = lambda: {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}  # noqa: E731
    before = lora()
    trainer.train()
    host_copies, clone = [], deepspeed.checkpoint.utils.clone_tensors_for_torch_save
    deepspeed.checkpoint.utils.clone_tensors_for_torch_save = lambda *a, **k: host_copies.append(1) or clone(*a, **k)
    trainer.save_model(os.path.join(out_dir, "saved"))
    rank = trainer.accelerator.process_index
    torch.save({"before": before, "after": lora(), "deepspeed": trainer.is_deepspeed_enabled,
                "world": trainer.accelerator.num_processes, "log_history": trainer.state.log_history,
                "host_copies": len(host_copies)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    exit_without_teardown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
