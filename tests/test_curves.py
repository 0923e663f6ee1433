"""curves.py: the PNG from a hand-made log history (series missing or not), train.py's
training_curves.png, and `python curves.py OUTPUT_DIR` re-plotting from a checkpoint."""
import os
import struct

import pytest

import curves
from errors import run_cli
from tests.tiny_run import trained_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) of a valid PNG; fails on anything else."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_real_png(path):
    width, height = png_size(path)
    assert width >= 500 and height >= 300 and os.path.getsize(path) > 10_000


def hand_made_history(steps: int = 30) -> list[dict]:
    history = []
    for step in range(1, steps + 1):
        history.append({"step": step, "loss": 1 / step, "loss/token": 0.5 / step, "loss/item": 0.5 / step,
                        "reward/mean": step / steps, "reward/ndcg": step / steps * 0.9,
                        "completions/mean_length": 100 + step, "learning_rate": 1e-5})
        if step % 10 == 0:
            history.append({"step": step, "eval_valid_ndcg@10": 0.01 * step})
    return history


def test_full_history_makes_a_png(tmp_path):
    path = tmp_path / "curves.png"
    curves.plot_training_curves(hand_made_history(), str(path))
    assert_real_png(path)


@pytest.mark.parametrize("keep", [set(), {"step", "reward/mean"}, {"step", "eval_valid_ndcg@10"}])
def test_missing_series_are_skipped(tmp_path, keep):
    history = [{k: v for k, v in entry.items() if k in keep} for entry in hand_made_history()]
    steps, values = curves.series(history, "reward/mean")
    assert len(steps) == (30 if "reward/mean" in keep else 0) == len(values)
    path = tmp_path / "curves.png"
    curves.plot_training_curves(history, str(path))
    assert_real_png(path)


def test_train_py_writes_curves_and_the_command_replots_them(tmp_path_factory, tmp_path):
    run_dir = trained_run(tmp_path_factory)
    assert_real_png(os.path.join(run_dir, "training_curves.png"))
    path = tmp_path / "replot.png"
    assert run_cli(curves.main, [run_dir, "--output", str(path)]) == str(path)
    assert_real_png(path)
    state = curves.latest_trainer_state(run_dir)
    assert state == os.path.join(run_dir, "trainer_state.json")  # train.py's final one, newer than checkpoint-1's


def test_folder_without_trainer_state_gives_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(curves.main, [str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no trainer_state.json")
