"""Time README command one (`bash quickstart.sh`) the way a newcomer meets it: in a fresh clone.

    python3 bench/bench_quickstart.py                 # clones HEAD into a temporary folder
    python3 bench/bench_quickstart.py --keep /tmp/qs  # ... into this folder, kept afterwards

The clone has no `.venv` and no converted model, so the wall time includes installing the
packages (from pip's cache or the package index), converting the embedded SmolLM2 and the run.
Prints the total, peak memory (largest child process) and the training's own split from
`trainer_state.json`: evaluations, rollouts and updates. Python standard library only.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", help="clone into this (new) folder and keep it")
    parser.add_argument("quickstart_args", nargs="*", help="passed to quickstart.sh, e.g. -- --seed 1")
    args = parser.parse_args()
    scratch = None if args.keep else tempfile.mkdtemp(prefix="r2ec_quickstart_")
    folder = args.keep or os.path.join(scratch, "repo")
    try:
        subprocess.run(["git", "clone", "-q", ROOT, folder], check=True)
        start = time.perf_counter()
        done = subprocess.run(["bash", "quickstart.sh", *args.quickstart_args], cwd=folder,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        report(done, wall, folder)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.keep:
        print(f"\nclone: {folder}")


def report(done: subprocess.CompletedProcess, wall: float, folder: str):
    """The before/after table and the time split of one finished quickstart.sh."""
    if done.returncode != 0:
        sys.exit(f"error: quickstart.sh failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    state = json.load(open(os.path.join(folder, "outputs", "quickstart", "trainer_state.json")))
    history = state["log_history"]
    evals = [e["eval_seconds"] for e in history if "eval_seconds" in e]
    rollouts = [e["time/rollout_s"] for e in history if "time/rollout_s" in e]
    updates = [e["time/update_s"] for e in history if "time/update_s" in e]
    runtime = next(e["train_runtime"] for e in history if "train_runtime" in e)
    header = done.stdout.index("ndcg@5  ndcg@10")
    table = done.stdout[done.stdout.rindex("\n", 0, header) + 1:].split("\n\n")[0]
    print(f"\n{table}\n")
    print("| stage | measured |\n|---|---|")
    print(f"| whole command (install, conversion, preprocessing, training, printing) | {wall:.0f} s |")
    print(f"| train.py's train_runtime | {runtime:.0f} s |")
    print(f"| evaluations ({len(evals)}) | {' + '.join(f'{s:.0f}' for s in evals)} s |")
    print(f"| rollout per step (median of {len(rollouts)}) | {statistics.median(rollouts):.1f} s |")
    print(f"| update per step (median of {len(updates)}) | {statistics.median(updates):.1f} s |")
    print(f"| peak RSS of one process | {peak_gib:.1f} GiB |")


if __name__ == "__main__":
    main()
