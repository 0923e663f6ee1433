"""Training curves of an R²ec run as one PNG: reward, losses, reasoning length, valid NDCG@10.

train.py writes `OUTPUT_DIR/training_curves.png` when training ends. To re-plot a run, finished or
still going, from the newest `trainer_state.json` in the folder or its `checkpoint-*` folders:
    python curves.py outputs/r2ec                       # -> outputs/r2ec/training_curves.png
    python curves.py outputs/r2ec --output curves.png
Tests: `pytest tests/test_curves.py`.
"""
import argparse
import glob
import os
import sys

# errors.py before the libraries: its excepthook makes Ctrl-C while they import one line
from errors import (UserError, check_not_blank, check_output_file, one_line_parser_errors, read_json, run_cli,
                    write_atomically)
from dataset import is_dataset

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


# (panel title, log_history keys drawn in it); the keys are those RecPOTrainer logs.
CURVES_FILE = "training_curves.png"  # in the run's folder
PANELS = (
    ("reward", ("reward/mean", "reward/ndcg")),
    ("loss", ("loss/token", "loss/item", "loss")),
    ("reasoning length (tokens)", ("completions/mean_length",)),
    ("valid NDCG@10", ("eval_valid_ndcg@10",)),
)


def series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key, in logging order; entries without it, or with a value
    or step that is not a finite number (as a float), are skipped. So are those within a factor 16
    of the largest float (a diverged run's): matplotlib's axis from -1e308 to 1e308 overflows."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max / 16

    points = [(entry.get("step", i), entry[key]) for i, entry in enumerate(log_history)
              if number(entry.get(key)) and number(entry.get("step", i))]
    return [s for s, _ in points], [v for _, v in points]


def plot_training_curves(log_history: list[dict], path: str) -> Figure:
    """Write a 2×2 PNG of the run's curves to `path` (the figure is returned); a key never logged
    is left out of its panel.

    Drawn on a bare Agg canvas rather than through pyplot: importing this module (train.py does)
    then changes no global backend and leaves no figure alive in the training process.
    """
    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, keys) in zip(figure.subplots(2, 2).flat, PANELS):
        drawn = 0
        for key in keys:
            steps, values = series(log_history, key)
            if steps:
                axes.plot(steps, values, label=key, marker="o" if len(steps) < 20 else None, markersize=3)
                drawn += 1
        if drawn:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes, color="gray")
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format=image_format(path), dpi=100))
    return figure


def image_format(path: str) -> str:
    """The file format `path`'s extension names (png without one)."""
    return os.path.splitext(path)[1][1:].lower() or "png"


def check_output(path: str, flag: str = "--output") -> None:
    """The image path must name a format matplotlib writes, in an existing, writable folder."""
    formats = set(FigureCanvasAgg(Figure()).get_supported_filetypes()) - {"pgf"}  # pgf needs a LaTeX install
    if image_format(path) not in formats:
        raise UserError(f"{flag} {path!r}: cannot write .{image_format(path)} images — end the name in .png "
                        "(or .pdf, .svg, .jpg)")
    check_output_file(path, flag)


def read_log_history(state_file: str) -> list[dict]:
    """trainer_state.json's log_history, checked."""
    fix = "retry if the run is saving right now, else delete it or pass one of the run's checkpoint-* folders"
    history = read_json(state_file, fix).get("log_history")
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise UserError(f"{state_file!r} has no log_history (a list of log entries) — {fix}")
    if not any(series(history, key)[0] for _, keys in PANELS for key in keys):
        raise UserError(f"{state_file!r} logs none of the plotted values yet — rerun once the run has logged a step")
    return history


def latest_trainer_state(output_dir: str) -> str:
    """The newest trainer_state.json in `output_dir` or its checkpoint-* folders.

    Newest by modification time, not by step number: after a resume, or with the best checkpoint
    kept beside later ones, the last written file holds the longest history.
    """
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir!r} is not a folder — pass the --output_dir of a training run")
    candidates = glob.glob(os.path.join(glob.escape(output_dir), "trainer_state.json"))
    candidates += glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*", "trainer_state.json"))
    if not candidates and is_dataset(output_dir):
        raise UserError(f"{output_dir!r} is a dataset folder — pass the --output_dir of a training run")
    if not candidates:
        raise UserError(f"no trainer_state.json in {output_dir!r} or its checkpoint-* folders — pass the "
                        "--output_dir of a training run (one that has saved a checkpoint: see --save_steps)")
    return max(candidates, key=modified_time)


def modified_time(path: str) -> float:
    """A file's modification time; -1 for one removed meanwhile (a checkpoint the running run rotated out)."""
    try:
        return os.path.getmtime(path)
    except OSError:
        return -1.0


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(description="Plot the training curves of an R²ec run.")
    one_line_parser_errors(parser, "python curves.py --help")
    parser.add_argument("output_dir", type=os.path.expanduser, help="The --output_dir of a train.py run.")
    parser.add_argument("--output", type=os.path.expanduser, help="Image to write: .png, .pdf, .svg, ... "
                        "(default: OUTPUT_DIR/training_curves.png).")
    args = parser.parse_args(argv)
    check_not_blank("--output", args.output, "pass an image name, or leave the flag out")
    state_file = latest_trainer_state(args.output_dir)
    path = args.output or os.path.join(args.output_dir, CURVES_FILE)
    check_output(path, "--output" if args.output else "the default --output")
    log_history = read_log_history(state_file)
    plot_training_curves(log_history, path)
    print(f"{path}  ({len(log_history)} log entries from {state_file})")
    return path


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
