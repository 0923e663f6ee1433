"""train.py's trainer under `accelerate launch`, saving each process's LoRA weights before/after.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \
        tests/ds_train_worker.py OUT_DIR --deepspeed ds_config.json --dataset_dir ... [train.py flags]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import build_trainer, parse_config  # noqa: E402


def main(out_dir: str, argv: list[str]):
    trainer = build_trainer(parse_config(argv))
    lora = lambda: {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}  # noqa: E731
    before = lora()
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"before": before, "after": lora(), "deepspeed": trainer.is_deepspeed_enabled,
                "world": trainer.accelerator.num_processes}, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
