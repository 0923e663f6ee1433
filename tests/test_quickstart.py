"""The quick-start pipeline (preprocess → train → before/after table → one example) at a tiny size."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import quickstart
from errors import UserError
from tests.backbones import tiny_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_pipeline_prints_the_table_and_an_example(tmp_path):
    result = subprocess.run(
        [sys.executable, "quickstart.py", "--model", tiny_backbone("qwen2"), "--steps", "1", "--eval_samples", "4",
         "--output_dir", str(tmp_path / "quick"), "--float32"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    train_command = next(line for line in out.splitlines() if line.startswith("$ ") and "train.py" in line)
    flags = train_command.split()
    assert flags[flags.index("--bf16") + 1] == "False" and "note: this CPU" not in out
    assert flags[flags.index("--use_cpu") + 1] == str(not torch.cuda.is_available())  # the CPU meant: no warning
    assert "warning: no GPU visible" not in result.stderr
    # The table: the step-0 evaluation (before) and the final one (after), as the run saved them
    run = tmp_path / "quick"
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    saved = {"before": next(e for e in history if e.get("step") == 0 and "eval_valid_ndcg@10" in e),
             "after": json.loads((run / "final_results.json").read_text())}
    lines = out.splitlines()
    names = next(line.split() for line in lines if line.split()[:1] == ["ndcg@5"])
    table = {" ".join(line.split()[:2]): [float(v) for v in line.split()[2:]] for line in lines
             if re.match(r"(valid|test) (before|after) ", line)}
    assert table == {f"{split} {when}": pytest.approx([saved[when][f"eval_{split}_{m}"] for m in names], abs=5e-5)
                     for split in ("valid", "test") for when in ("before", "after")}
    # The example: the final evaluation's first test record
    [step] = {e["step"] for e in history if "eval_test_ndcg@10" in e} - {0}
    record = json.loads((run / "reasoning" / f"step{step}_test.jsonl").read_text().splitlines()[0])
    example = out[out.index("== test row"):]
    assert f"== test row {record['row']} · user {record['user_id']} ==" in example
    assert "reasoning:\n" + textwrap.indent(record["reasoning"], "  ") + "\ntop 5" in example
    assert [line.split()[-1].rstrip(")") for line in example.splitlines() if "(item " in line][:5] == [
        str(item["item_id"]) for item in record["top_k"][:5]]
    assert os.path.exists(run / "training_curves.png")
    assert os.path.isdir(os.path.join(ROOT, "data", "sample", "Video_Games_0_2022-10-2023-10"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CPU's instructions do not matter")
def test_a_cpu_without_bf16_instructions_is_told_apart(tmp_path, monkeypatch):
    import quickstart

    cpuinfo = tmp_path / "cpuinfo"
    for line, lacks in (("flags\t\t: fpu avx2 avx512f avx512_vnni sha_ni", True),
                        ("flags\t\t: fpu avx512f amx_bf16 amx_tile", False), ("flags\t\t: avx512f avx512_bf16", False),
                        ("Features\t: fp asimd sve bf16 i8mm", False), ("Features\t: fp asimd evtstrm crc32", True)):
        cpuinfo.write_text(f"processor\t: 0\n{line}\n")
        assert quickstart.cpu_lacks_bf16(str(cpuinfo)) is lacks, line
    assert quickstart.cpu_lacks_bf16(str(tmp_path / "missing")) is False  # not Linux: no claim
    monkeypatch.setattr(quickstart, "cpu_lacks_bf16", lambda: True)
    assert "bash quickstart.sh --float32" in quickstart.bf16_note(float32=False)
    assert quickstart.bf16_note(float32=True) is None
    args = quickstart.parse_args([])
    assert quickstart.train_flags(args, bf16=not args.float32)[-4:-2] == ["--bf16", "True"]  # bf16 by default


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-1"], "--steps -1: must be at least 1"),  # train.py would take it as whole epochs (hours)
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--eval_samples", "0"], "--eval_samples 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be between 0 and 2**32 - 1"),  # train.py would refuse these three
    (["--eval_samples", str(2 ** 63)], f"--eval_samples {2 ** 63}: too large"),  # train.py named its own flags
    (["--steps", str(2 ** 63)], f"--steps {2 ** 63}: too large"),
    (["--model", "gemma"], "model 'Gemma-2-2b-it' points to '/path/to/your/gemma-2-2b-it', which is a placeholder"),
    (["--output_dir", "README.md"], "--output_dir README.md is a file — pass a folder you can write to"),
    (["--output_dir", "/proc/r2ec_quick"], "--output_dir /proc/r2ec_quick cannot be created: no folder can be made "
                                           "in /proc (No such file or directory) — pass a folder you can write to"),
])
def test_bad_flags_are_refused_before_preprocessing(tmp_path, flags, message):
    """parse_args runs before preprocess.py, which rewrites data/sample's dataset. (The one-line
    error of the command itself: test_a_folder_holding_other_files_is_refused_untouched.)"""
    with pytest.raises(UserError, match=re.escape(message)):
        quickstart.parse_args(["--output_dir", str(tmp_path / "quick"), *flags])
    assert not (tmp_path / "quick").exists()


@pytest.mark.parametrize("given", ["{tmp}/my_run", "~/my_run"])  # ~ as train.py reads it: the same folder
def test_a_folder_holding_another_run_is_refused_untouched(tmp_path, monkeypatch, given):
    run = tmp_path / "my_run"
    (run / "checkpoint-40").mkdir(parents=True)
    (run / "r2ec_run.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError) as caught:
        quickstart.parse_args(["--output_dir", given.format(tmp=tmp_path)])
    assert str(caught.value).startswith(f"--output_dir {run} holds an earlier run"), caught.value
    assert sorted(os.listdir(run)) == ["checkpoint-40", "r2ec_run.json"]


@pytest.mark.parametrize("kind", ["a file", "foreign files"])
def test_a_dataset_folder_preprocess_py_would_refuse_is_refused_with_a_quick_start_fix(tmp_path, monkeypatch, kind):
    """preprocess.py's own refusal ends with "pass --postfix", a flag the quick start lacks."""
    monkeypatch.setattr(quickstart, "ROOT", str(tmp_path))
    target = tmp_path / quickstart.DATASET_DIR
    target.parent.mkdir(parents=True)
    if kind == "a file":
        target.write_text("mine")
        expected = f"{target} is a file, not a dataset folder, and the new dataset would replace it — move it away"
    else:
        (target / "run1").mkdir(parents=True)
        expected = (f"{target} holds run1, which preprocess.py did not write, and the new dataset replaces the folder "
                    "as a whole — move them out of it")
    with pytest.raises(UserError) as caught:
        quickstart.parse_args(["--output_dir", str(tmp_path / "quick")])
    assert str(caught.value) == expected + " (the quick start writes its dataset there)"
    assert target.read_text() == "mine" if kind == "a file" else os.listdir(target) == ["run1"]


def test_a_folder_holding_other_files_is_refused_untouched(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "quickstart.py", "--output_dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and result.stdout == "", lines  # nothing was started
    assert lines[0].startswith(f"error: --output_dir {tmp_path} holds README.md, not an earlier run's"), lines
    assert (tmp_path / "README.md").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["README.md", "notes.txt"]


def test_ctrl_c_ends_a_step_with_one_line(tmp_path):
    """The terminal's Ctrl-C reaches the quick start and its running step alike: the step says
    "error: interrupted" and the quick start ends with its code, without a second line."""
    step = [sys.executable, "-c", "import time, errors\n"
                                  "errors.run_cli(lambda: print('ready', flush=True) or time.sleep(60))"]
    run_step = f"import quickstart, errors; errors.run_cli(quickstart.run, {step!r})"
    quick = subprocess.Popen([sys.executable, "-c", run_step], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True,  # Ctrl-C as from a terminal, even where the
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # tests run with it ignored
    for line in quick.stdout:
        if "ready" in line:
            break
    else:
        pytest.fail(f"the step never started: {quick.communicate()[1]}")
    os.killpg(quick.pid, signal.SIGINT)
    _, stderr = quick.communicate(timeout=60)
    assert quick.returncode == 130 and stderr.splitlines() == ["error: interrupted"], stderr


def test_kill_of_the_quick_start_alone_stops_its_step_with_one_line(tmp_path):
    """SIGTERM to the quick start's process only (`kill PID`): its step stops too, not trains on orphaned."""
    step = [sys.executable, "-c", "import os, time, errors\n"
                                  "errors.run_cli(lambda: print('ready', os.getpid(), flush=True) or time.sleep(60))"]
    run_step = f"import quickstart, errors; errors.run_cli(quickstart.run, {step!r}, interrupt_on_sigterm=False)"
    quick = subprocess.Popen([sys.executable, "-c", run_step], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    for line in quick.stdout:
        if line.startswith("ready"):
            step_pid = int(line.split()[1])
            break
    else:
        pytest.fail(f"the step never started: {quick.communicate()[1]}")
    os.kill(quick.pid, signal.SIGTERM)
    _, stderr = quick.communicate(timeout=30)
    assert quick.returncode == 130 and stderr.splitlines() == ["error: interrupted"], stderr  # the step's own line
    with pytest.raises(ProcessLookupError):
        os.kill(step_pid, 0)


def test_a_step_killed_by_a_signal_is_named_in_one_line(tmp_path, capsys):
    """The out-of-memory killer's SIGKILL leaves the step no line of its own."""
    step = tmp_path / "train.py"
    step.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(SystemExit) as caught:
        quickstart.run([sys.executable, str(step)])
    assert caught.value.code == 128 + signal.SIGKILL
    assert capsys.readouterr().err.splitlines() == [
        "error: train.py was killed by SIGKILL — most often the machine's memory (RAM) ran out: see `dmesg`, then "
        "free some memory (the quick start peaks at about 7 GiB, 15.5 with --float32)"]


def test_a_hub_id_missing_from_the_cache_is_refused_offline_before_preprocessing(tmp_path, monkeypatch):
    """quickstart.sh runs offline, so an uncached hub id could only fail after preprocessing; a cached one loads."""
    import huggingface_hub.constants
    import model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(model, "is_offline_mode", lambda: True)
    flags = ["--output_dir", str(tmp_path / "quick"), "--model", "google/gemma-2-2b-it"]
    with pytest.raises(UserError) as caught:
        quickstart.parse_args(flags)
    assert str(caught.value) == ("--model google/gemma-2-2b-it: 'google/gemma-2-2b-it' is a hub id that is not in the "
                                 "Hugging Face cache, and the quick start runs offline (HF_HUB_OFFLINE=1) — download "
                                 "it first (hf download google/gemma-2-2b-it), or pass a local model folder")
    snapshot = tmp_path / "hub" / "models--google--gemma-2-2b-it" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert quickstart.parse_args(flags).model == "google/gemma-2-2b-it"  # downloaded before: loads offline
    monkeypatch.setattr(model, "is_offline_mode", lambda: False)
    flags[-1] = "google/not-downloaded"
    assert quickstart.parse_args(flags).model == "google/not-downloaded"  # online: downloaded when loaded
    assert not (tmp_path / "quick").exists()
