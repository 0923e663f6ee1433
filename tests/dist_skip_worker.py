"""Two RecPO steps on two processes, process 1 running out of memory in its first rollout; run
by tests/test_trainer.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_skip_worker.py OUT.json

Both processes must skip step 1 and train step 2. Process 0 has recorded step 1's rollout times,
process 1 nothing but the skip, so the logged metrics differ between them: logging must still
pair every process's values with the right keys and leave both in step. Rank 0 writes the log
history, each process's skip warnings and a checksum of each process's LoRA weights.
"""
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate.utils import gather_object  # noqa: E402

from tests.dist_update_worker import exit_without_teardown, tiny_lora_model  # noqa: E402
from tests.tiny_data import tiny_config, tiny_dataset  # noqa: E402
from trainer import RecPOTrainer  # noqa: E402


def main(out_path: str):
    config = tiny_config(os.path.join(os.path.dirname(os.path.abspath(out_path)), "run"), max_new_tokens=8, lora_dropout=0.0, gradient_checkpointing=False,
                         max_steps=2)
    model, tokenizer = tiny_lora_model()
    trainer = RecPOTrainer(model, config, tokenizer, tiny_dataset(), "Video_Games")
    rank = trainer.accelerator.process_index
    if rank == 1:
        rollout, calls = trainer.rollout, []

        def out_of_memory_once(model, samples, *args):
            calls.append(samples)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return rollout(model, samples, *args)

        trainer.rollout = out_of_memory_once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    skips = gather_object([[str(w.message) for w in caught if "skipped" in str(w.message)]])
    checksums = gather_object([sum(p.double().sum().item() for n, p in model.named_parameters() if "lora_" in n)])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"log_history": trainer.state.log_history, "skips": skips, "checksums": checksums}, f)
    exit_without_teardown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
