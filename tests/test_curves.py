"""curves.py: the PNG from a hand-made log history (series missing or not), train.py's
training_curves.png, and `python curves.py OUTPUT_DIR` re-plotting from a checkpoint."""
import json
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


def drawn(figure) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel title: {line label: (steps, values)}}; a panel without lines maps to its text."""
    panels = {}
    for axes in figure.axes:
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}
        panels[axes.get_title()] = lines or [text.get_text() for text in axes.texts]
    return panels


def test_full_history_makes_a_png_of_every_series(tmp_path):
    path = tmp_path / "curves.png"
    panels = drawn(curves.plot_training_curves(hand_made_history(), str(path)))
    assert_real_png(path)
    steps = list(range(1, 31))
    assert panels == {
        "reward": {"reward/mean": (steps, [s / 30 for s in steps]), "reward/ndcg": (steps, [s / 30 * 0.9 for s in steps])},
        "loss": {"loss/token": (steps, [0.5 / s for s in steps]), "loss/item": (steps, [0.5 / s for s in steps]),
                 "loss": (steps, [1 / s for s in steps])},
        "reasoning length (tokens)": {"completions/mean_length": (steps, [100 + s for s in steps])},
        "valid NDCG@10": {"eval_valid_ndcg@10": ([10, 20, 30], [0.1, 0.2, 0.3])},
    }


def test_a_series_is_the_key_s_numeric_points_in_logging_order():
    history = hand_made_history()
    assert curves.series(history, "eval_valid_ndcg@10") == ([10, 20, 30], [0.1, 0.2, 0.3])
    odd = [{"step": 1, "x": 0.5}, {"step": 2, "x": True}, {"step": 3, "x": "n/a"}, {"step": "?", "x": 0.7},
           {"x": 0.9}, {"step": 6, "y": 1.0}, {"step": 7, "x": 2}, {"step": 8, "x": float("nan")},
           {"step": 9, "x": float("inf")}, {"step": 10, "x": 10**400}]
    assert curves.series(odd, "x") == ([1, 4, 7], [0.5, 0.9, 2])  # no step: the entry's position


@pytest.mark.filterwarnings("error")  # not even matplotlib's overflow warnings
def test_values_near_the_largest_float_are_left_out_as_they_would_overflow_the_axis(tmp_path):
    history = [{"step": 1, "loss": 1.7e308}, {"step": 2, "loss": -1.2e307}, {"step": 3, "loss": 1.1e307},
               {"step": 4, "loss": -1.1e307}, {"step": 1.7e308, "loss": 1.0}, {"step": 5, "loss": 1.0}]
    path = tmp_path / "curves.png"
    panels = drawn(curves.plot_training_curves(history, str(path)))
    assert_real_png(path)
    assert panels["loss"] == {"loss": ([3, 4, 5], [1.1e307, -1.1e307, 1.0])}  # float max / 16 ≈ 1.12e307


@pytest.mark.parametrize("keep", [set(), {"step", "reward/mean"}, {"step", "eval_valid_ndcg@10"}])
def test_missing_series_are_skipped(tmp_path, keep):
    history = [{k: v for k, v in entry.items() if k in keep} for entry in hand_made_history()]
    steps, values = curves.series(history, "reward/mean")
    assert len(steps) == (30 if "reward/mean" in keep else 0) == len(values)
    path = tmp_path / "curves.png"
    panels = drawn(curves.plot_training_curves(history, str(path)))
    assert_real_png(path)
    assert panels["reward"] == ({"reward/mean": (list(range(1, 31)), [s / 30 for s in range(1, 31)])}
                                if "reward/mean" in keep else ["not logged"])
    assert panels["loss"] == ["not logged"]


def test_train_py_writes_curves_and_the_command_replots_them(tmp_path_factory, tmp_path):
    run_dir = trained_run(tmp_path_factory)
    assert_real_png(os.path.join(run_dir, "training_curves.png"))
    path = tmp_path / "replot.png"
    assert run_cli(curves.main, [run_dir, "--output", str(path)]) == str(path)
    assert_real_png(path)
    state = curves.latest_trainer_state(run_dir)
    assert state == os.path.join(run_dir, "trainer_state.json")  # train.py's final one, newer than checkpoint-1's


def test_run_folder_named_with_glob_characters(tmp_path):
    run = tmp_path / "run[1]"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert curves.latest_trainer_state(str(run)) == str(run / "checkpoint-2" / "trainer_state.json")


def test_a_checkpoint_removed_while_the_newest_state_is_sought_is_passed_over(tmp_path, monkeypatch):
    """A running run rotates old checkpoints out (--save_total_limit): one may go between the
    listing and the reading of its time."""
    for step, age in ((2, 100), (4, 0)):
        state = tmp_path / f"checkpoint-{step}" / "trainer_state.json"
        state.parent.mkdir()
        state.write_text("{}")
        os.utime(state, (1e9 - age, 1e9 - age))
    listing = curves.glob.glob
    monkeypatch.setattr(curves.glob, "glob", lambda pattern: listing(pattern) + (
        [str(tmp_path / "checkpoint-1" / "trainer_state.json")] if "checkpoint-*" in pattern else []))
    assert curves.latest_trainer_state(str(tmp_path)) == str(tmp_path / "checkpoint-4" / "trainer_state.json")


def test_folder_without_trainer_state_gives_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(curves.main, [str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no trainer_state.json in {str(tmp_path)!r} or its checkpoint-* folders — pass the --output_dir of a "
        "training run (one that has saved a checkpoint: see --save_steps)")


def test_a_dataset_folder_is_named_as_one(tmp_path, capsys):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    error = run_curves_error(capsys, str(tmp_path))
    assert error == f"error: {str(tmp_path)!r} is a dataset folder — pass the --output_dir of a training run"


def test_the_default_image_path_is_named_as_such(run_folder, capsys):
    (run_folder / "training_curves.png").mkdir()
    error = run_curves_error(capsys, str(run_folder))
    assert f"the default --output {str(run_folder / 'training_curves.png')!r} is a folder" in error


def run_curves_error(capsys, *argv) -> str:
    """curves.py's main exits 2; -> its last stderr line, checked to be one `error: ` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(curves.main, list(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def run_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 30, "log_history": hand_made_history()}))
    return folder


@pytest.mark.parametrize("content, message", [
    ('{"global_step": 30, "log_history": [{"step": 1, "lo', "is not readable JSON"),  # truncated mid-write
    ('{"global_step": 30}', "has no log_history"),
    ('{"log_history": [1, 2]}', "has no log_history"),
    ("[]", "holds a JSON list, not an object"),
    (json.dumps({"log_history": [{"step": [1], "loss": 0.5}]}), "logs none of the plotted values"),  # a step that is no number
    ('{"log_history": []}', "logs none of the plotted values yet"),
    ('{"log_history": [{"step": 1, "reward/mean": [0.5], "loss": {"a": 1}}]}', "logs none of the plotted values yet"),
])
def test_corrupt_trainer_state_gives_one_line(run_folder, capsys, content, message):
    (run_folder / "trainer_state.json").write_text(content)
    error = run_curves_error(capsys, str(run_folder))
    assert str(run_folder / "trainer_state.json") in error and message in error
    assert os.listdir(run_folder) == ["trainer_state.json"]


@pytest.mark.parametrize("output, message", [
    ("MISSING/c.png", "does not exist"),
    ("FILE/c.png", "/file' is a file — move it or pick another path"),
    ("LINK/c.png", "/link' is a link to a missing place (or a loop of links) — fix it or pick another path"),
    ("FOLDER", "is a folder"),
    ("FOLDER/c.xyz", "cannot write .xyz images — end the name in .png"),
    ("FOLDER/c.pgf", "cannot write .pgf images — end the name in .png"),  # matplotlib lists it, but runs xelatex
    ("/proc/c.png", "— pick a path in a folder you can write to"),  # writable to access() as root, yet no file there
])
def test_bad_output_gives_one_line(run_folder, tmp_path, capsys, output, message):
    output = output.replace("MISSING", str(tmp_path / "missing")).replace("FOLDER", str(tmp_path / "out"))
    output = output.replace("FILE", str(tmp_path / "file")).replace("LINK", str(tmp_path / "link"))
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "gone", tmp_path / "link")  # mkdir of it fails: "File exists"
    (tmp_path / "file").write_text("")
    error = run_curves_error(capsys, str(run_folder), "--output", output)
    assert f"--output {output!r}" in error and message in error
    assert os.listdir(tmp_path / "out") == [] and not (tmp_path / "missing").exists()


def test_failed_write_leaves_no_broken_png(run_folder, capsys, monkeypatch):
    path = run_folder / "training_curves.png"
    curves.plot_training_curves(hand_made_history(), str(path))
    before = path.read_bytes()

    def disk_full(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)  # a partial image, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(curves.Figure, "savefig", disk_full)
    error = run_curves_error(capsys, str(run_folder))
    assert error.endswith(f"cannot write {str(path)!r} (No space left on device) — free some space or pick another path")
    assert sorted(os.listdir(run_folder)) == ["trainer_state.json", "training_curves.png"]
    assert path.read_bytes() == before  # the earlier image is left whole


def test_a_write_failing_for_another_reason_than_space_does_not_blame_the_disk(run_folder, capsys, monkeypatch):
    def denied(self, fname, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(curves.Figure, "savefig", denied)
    error = run_curves_error(capsys, str(run_folder))
    assert error.endswith(f"cannot write {str(run_folder / 'training_curves.png')!r} (Permission denied) — pick "
                          "another path")


def test_an_empty_output_is_refused_not_read_as_the_default(run_folder, capsys):
    error = run_curves_error(capsys, str(run_folder), "--output", "")
    assert error == "error: --output is empty (an unset variable?) — pass an image name, or leave the flag out"
    error = run_curves_error(capsys, str(run_folder), "--output", " ")
    assert error.startswith("error: --output is blank (' ') (an unset variable?) — pass an image name")
    assert sorted(os.listdir(run_folder)) == ["trainer_state.json"]
