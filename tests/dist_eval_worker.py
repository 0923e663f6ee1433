"""Greedy evaluation of one split, shared across processes; run by tests/test_trainer.py.

    python -m torch.distributed.run --nproc_per_node 4 tests/dist_eval_worker.py OUT.json

Nine samples over four processes leave some processes short: accelerate pads them with copies
of the last sample, which must count once. The item table's refresh is split between the
processes too. Rank 0 writes the split's metrics and records, the table, and how many items
each process encoded.
"""
import json
import os
import sys
import tempfile

import torch
from accelerate.utils import gather_object

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import load_backbone  # noqa: E402
from tests.backbones import tiny_backbone  # noqa: E402
from tests.dist_update_worker import exit_without_teardown  # noqa: E402
from tests.tiny_data import tiny_config, tiny_dataset  # noqa: E402
from trainer import RecPOTrainer  # noqa: E402

SAMPLES = 9


def main(out_path: str):
    config = tiny_config(tempfile.mkdtemp(), per_device_eval_batch_size=2, max_new_tokens=8)
    model, tokenizer = load_backbone(tiny_backbone("qwen2"), dtype=torch.float32)
    trainer = RecPOTrainer(model, config, tokenizer, tiny_dataset(num_eval=SAMPLES), "Video_Games")
    encoded = []
    encode = trainer.item_table.encode
    trainer.item_table.encode = lambda model, item_ids, **kwargs: encoded.append(len(item_ids)) or encode(
        model, item_ids, **kwargs)
    trainer.refresh_item_table(model)
    metrics, records = trainer.evaluate_split(model, trainer.eval_dataset["valid"], "valid")
    encoded = gather_object(encoded)
    if trainer.accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"metrics": metrics, "records": records, "encoded": encoded,
                       "table": trainer.item_table.embeddings.tolist()}, f)
    exit_without_teardown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
