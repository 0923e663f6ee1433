"""One tiny trained R²ec run shared by the tests that read a train.py output folder
(tests/test_recommend.py, tests/test_curves.py): one RecPO step on the tiny qwen2 backbone and
tiny_data saved as Video_Games_0_2022-10-2023-10, with an evaluation and a checkpoint at step 1.
Trained once per pytest process (~30 s on 2 cores), on first use.
"""
import os
import subprocess
import sys

from tests.backbones import tiny_backbone
from tests.tiny_data import tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY = "Video_Games"
_RUNS = {}


def trained_run(tmp_path_factory, *extra_flags: str) -> str:
    """Output folder of the shared run (its dataset folder is `r2ec_run.json`'s dataset_dir), or
    of a run with `extra_flags` added (e.g. `--bf16 True`), also trained once."""
    if extra_flags not in _RUNS:
        base = tmp_path_factory.mktemp("tiny_run")
        dataset_dir = str(base / f"{CATEGORY}_0_2022-10-2023-10")
        tiny_dataset().save_to_disk(dataset_dir)
        out = str(base / "out")
        flags = ["--dataset_dir", dataset_dir, "--model", tiny_backbone("qwen2"), "--bf16", "False",
                 "--report_to", "none", "--train_batch_size", "2", "--group_size", "2", "--micro_batch_size", "2",
                 "--max_new_tokens", "8", "--eval_batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "0",
                 "--max_steps", "1", "--eval_steps", "1", "--eval_on_start", "False", "--max_eval_samples", "4",
                 "--output_dir", out, *extra_flags]
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT,
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2",
                              TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions")))  # DeepSpeed's
        assert done.returncode == 0, done.stderr[-3000:]
        _RUNS[extra_flags] = out
    return _RUNS[extra_flags]
