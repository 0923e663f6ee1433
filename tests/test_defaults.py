"""The defaults a user gets without flags, and what launch_train.sh passes, are SPEC's (§4–§6)."""
import json
import re
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import train
from train import free_port
from errors import UserError
from model import LORA_TARGETS, TAU
from rollouts import SamplingConfig
from trainer import RecPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC_DEFAULTS = {
    # §4 RecPO
    "per_device_train_batch_size": 4, "group_size": 4, "gen_temperature": 1.5, "gen_top_k": 200, "gen_top_p": 1.0,
    "max_new_tokens": 640, "beta": 0.05, "reward_ndcg_k": 1000, "advantage_type": "gaussian",
    "trainer_relabel_topk": 1, "epsilon_low": 0.2, "epsilon_high": 0.28, "num_iterations": 1, "micro_batch_size": 4,
    "tau": 0.02, "similarity_type": "cosine",
    # §4 Defaults
    "lora_r": 4, "lora_alpha": 128, "lora_dropout": 0.05,
    "lora_target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "learning_rate": 1e-5, "warmup_steps": 32, "lr_scheduler_type": "constant_with_warmup", "max_grad_norm": 1.0,
    "bf16": True, "gradient_checkpointing": True, "num_train_epochs": 3, "seed": 42, "weight_decay": 0.0,
    # §2 prompt limits, §5 evaluation
    "window_size": 20, "max_prompt_tokens": 2048, "max_item_tokens": 768, "per_device_eval_batch_size": 32,
    "eval_on_start": True, "load_best_model_at_end": True, "metric_for_best_model": "eval_valid_ndcg@10",
    "greater_is_better": True, "early_stopping_patience": 8,
}


def test_flagless_config_has_the_spec_defaults():
    config = train.parse_config([])
    actual = {name: getattr(config, name) for name in SPEC_DEFAULTS}
    actual["lr_scheduler_type"] = str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type))
    assert actual == SPEC_DEFAULTS
    assert config.optim.startswith("adamw")
    assert config.ddp_find_unused_parameters is False  # every LoRA weight is used: DDP skips its graph search
    assert config.sampling == SamplingConfig(max_new_tokens=640, temperature=1.5, top_k=200, top_p=1.0)
    flags = ["--gen_temperature", "2.0", "--gen_top_k", "50", "--gen_top_p", "0.9", "--max_new_tokens", "32"]
    assert train.parse_config(flags).sampling == SamplingConfig(32, temperature=2.0, top_k=50, top_p=0.9)
    ablation = train.parse_config(["--reasoning", "False", "--group_size", "4", "--trainer_relabel_topk", "2"])
    assert (ablation.reasoning, ablation.group_size, ablation.trainer_relabel_topk) == (False, 1, 1)
    assert TAU == 0.02 and ",".join(LORA_TARGETS) == SPEC_DEFAULTS["lora_target_modules"]


# floor(27,498 / (4·1·W) / 8) · I: 6,874 rollout batches an epoch on one process, 2,291 on three, each
# updated I times; evaluations (and checkpoints) fall after a batch's last update
@pytest.mark.parametrize("processes, iterations, expected", [(1, 1, 859), (3, 1, 286), (1, 2, 1718), (3, 3, 858)])
def test_evaluation_interval_is_an_eighth_of_an_epoch(monkeypatch, processes, iterations, expected):
    monkeypatch.setattr(RecPOConfig, "world_size", property(lambda self: processes))
    flags = ["--num_iterations", str(iterations)]
    assert train.parse_config(flags).default_eval_steps(27_498) == expected  # Musical_Instruments train


def test_preprocess_help_shows_spec_s_defaults():
    """SPEC §1's `--flag [default]` list, against what `python preprocess.py --help` says."""
    with open(os.path.join(ROOT, "docs", "SPEC.md")) as f:
        spec = dict(re.findall(r"--(\w+) \[(\w*)\]", f.read().split("## 2")[0]))
    assert len(spec) == 9
    shown = subprocess.run([sys.executable, "preprocess.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                           check=True, env=dict(os.environ, COLUMNS="200")).stdout
    helped = dict(re.findall(r"^  --(\w+) \w+\s+[^\n]*?\(default: (\w*)\)$", shown, re.MULTILINE))
    assert helped == {flag: value for flag, value in spec.items() if flag != "postfix"}  # none: no "(default: )"


def run_launcher(*args: str, environment=None, check=False, **variables) -> subprocess.CompletedProcess:
    """launch_train.sh with `args`, in `environment` (default: this one) plus `variables`, on a free
    MAIN_PROCESS_PORT unless they set one: the default 20138 may be taken on a test machine."""
    env = {"MAIN_PROCESS_PORT": free_port(), **(os.environ if environment is None else environment), **variables}
    return subprocess.run(["bash", os.path.join(ROOT, "launch_train.sh"), *args], env=env, capture_output=True,
                          text=True, check=check, timeout=300)


def launcher_arguments(words: list[str]) -> list[str]:
    """What launch_train.sh passes to `accelerate launch`, from its command echoed word by word."""
    assert words[0] == "launch.py", words[:4]
    return words[1:]


def test_launcher_passes_the_released_settings(tmp_path):
    port = free_port()  # not the default 20138, which a test machine may use: that is read from the script
    result = run_launcher("--max_steps", "5", environment={
        k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}, check=True, PYTHON="echo",
        MAIN_PROCESS_PORT=port)
    words = result.stdout.split()
    flags = {words[i]: words[i + 1] for i in range(len(words) - 1)
             if words[i].startswith("--") and not words[i + 1].startswith("--")}
    assert flags == {
        "--num_processes": "3", "--num_machines": "1", "--machine_rank": "0", "--main_process_ip": "127.0.0.1",
        "--main_process_port": port, "--deepspeed": "ds_config.json", "--model": "gemma",
        "--dataset_dir": "data/Musical_Instruments_0_2022-10-2023-10", "--dataset_category": "Musical_Instruments",
        "--train_batch_size": "4", "--eval_batch_size": "32", "--max_new_tokens": "640", "--warmup_steps": "32",
        "--num_train_epochs": "3", "--group_size": "4", "--trainer_relabel_topk": "2", "--gen_temperature": "2.0",
        "--gen_top_k": "50", "--seed": "42", "--run_name": "r2ec_gemma_Musical_Instruments", "--max_steps": "5",
    }
    assert launcher_arguments(words)[0] == "--multi_gpu" and "train.py" in words
    with open(os.path.join(ROOT, "launch_train.sh")) as f:
        assert "MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-20138}" in f.read()
    with open(os.path.join(ROOT, "ds_config.json")) as f:
        deepspeed = json.load(f)
    assert deepspeed["zero_optimization"]["stage"] == 2
    assert deepspeed["bf16"]["enabled"] == "auto" and deepspeed["gradient_clipping"] == "auto"  # from bf16, 1.0


def readme_launcher_table() -> list[tuple[list[str], list[str], list[str]]]:
    """README's table of launch_train.sh variables: (variables, train.py flags, defaults) per row."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("| variable | train.py flag | default | meaning |"):].split("\n\n")[0].splitlines()[2:]
    cells = [row.strip("|").split(" | ") for row in table]
    return [tuple([part.strip(" `") for part in cell.split(", ")] for cell in row[:3]) for row in cells]


def test_readme_names_each_launcher_variable_s_flag_and_default():
    """Set every variable to a value of its own: each reaches the flag README names; README's
    defaults are the script's."""
    rows = readme_launcher_table()
    flag_of = {variable: flag for variables, flags, _ in rows for variable, flag in zip(variables, flags) if flag != "–"}
    assert len(flag_of) == 15 and flag_of["RELABEL_TOPK"] == "--trainer_relabel_topk"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    result = run_launcher(environment=env, check=True, PYTHON="echo",
                          **{variable: f"set_{variable}" for variable in flag_of})
    words = result.stdout.split()
    assert {flag: words[words.index(flag) + 1] for flag in flag_of.values()} == {
        flag: f"set_{variable}" for variable, flag in flag_of.items()}
    with open(os.path.join(ROOT, "launch_train.sh")) as f:
        script = dict(re.findall(r"^(\w+)=\$\{\1:?-(.*?)\}(?:\s+#.*)?$", f.read(), re.MULTILINE))
    readme = {variable: default for variables, _, defaults in rows for variable, default in zip(variables, defaults)}
    assert readme == {variable: default.replace('"', "") for variable, default in script.items()}


@pytest.mark.parametrize("visible, seen", [(None, "0,1,2,3"), ("", ""), ("2,3", "2,3")])
def test_launcher_keeps_the_gpus_the_environment_names_even_none(tmp_path, visible, seen):
    """An empty CUDA_VISIBLE_DEVICES (no GPU) is kept, not replaced by the default 0,1,2,3."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "[$CUDA_VISIBLE_DEVICES]"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = run_launcher(environment=env, check=True, PYTHON=str(python))
    assert result.stdout.splitlines() == [f"[{seen}]"]  # the launch; the check's own output goes to /dev/null


def test_launcher_names_the_run_after_the_models_last_path_part():
    result = run_launcher(check=True, PYTHON="echo", MODEL="/data/models/Llama-3.2-3B-Instruct")
    words = result.stdout.split()
    assert words[words.index("--run_name") + 1] == "r2ec_Llama-3.2-3B-Instruct_Musical_Instruments"


def test_launcher_starts_a_single_process_without_multi_gpu(tmp_path):
    result = run_launcher(check=True, PYTHON="echo", NUM_PROCESSES="1")
    words = result.stdout.split()
    assert launcher_arguments(words)[0] == "--num_processes" and "--multi_gpu" not in words
    assert words[words.index("--num_processes") + 1] == "1"


def test_launcher_help_is_train_pys_printed_once():
    result = run_launcher("--help", check=True, PYTHON=sys.executable)
    assert result.stdout.count("usage: train.py") == 1 and "--group_size" in result.stdout


def test_launcher_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_launcher(PYTHON="echo", MAIN_PROCESS_PORT=port)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} is in use (another run on this machine?) — set MAIN_PROCESS_PORT to a free one"]


@pytest.mark.parametrize("variables, message", [
    ({"NUM_PROCESSES": "abc"}, "NUM_PROCESSES=abc is not a positive whole number"),
    ({"NUM_PROCESSES": "0"}, "NUM_PROCESSES=0 is not a positive whole number"),
    ({"NUM_PROCESSES": "08"}, "NUM_PROCESSES=08 is not a positive whole number"),
    ({"MAIN_PROCESS_PORT": "99999"}, "MAIN_PROCESS_PORT=99999 is not a port (1-65535) — fix it in the environment"),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "2"}, "MACHINE_RANK=2 must be 0 to NUM_MACHINES-1 (1)"),
    ({"MACHINE_RANK": "-1"}, "MACHINE_RANK=-1 must be 0 to NUM_MACHINES-1 (0)"),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "1"}, "NUM_MACHINES=2 with MAIN_PROCESS_IP=127.0.0.1 — set it to node 0's"),
    ({"DATASET_DIR": "/nonexistent/Musical_Instruments_0_2022-10-2023-10"}, "does not exist"),
    ({"DATASET_DIR": "mine/Video_Games_0_2022-10-2023-10"},  # read from the repository folder, which it names
     f"dataset folder 'mine/Video_Games_0_2022-10-2023-10' (relative to {ROOT}) does not exist"),
    ({"TRAIN_BATCH_SIZE": "many"}, "--train_batch_size: invalid int value: 'many'"),
    ({"RUN_NAME": "-x"}, "RUN_NAME=-x starts with '-', which train.py would read as a flag — rename it (a path: ./-x)"),
    ({"DATASET_DIR": "-data"}, "DATASET_DIR=-data starts with '-'"),  # was "--dataset_dir: expected one argument"
    ({"PYTHON": "/nonexistent/python3"}, "PYTHON=/nonexistent/python3 is not a command"),
    ({"PYTHON": "false"}, "PYTHON=false lacks some of torch transformers accelerate deepspeed datasets peft — activate"),
    ({"ARGS": "--model qwen"}, "error: --model given to launch_train.sh — set MODEL instead (MODEL=... bash "
                               "launch_train.sh): it also names the run's folder"),
    ({"ARGS": "--max_steps 5 --dataset_category=Video_Games"}, "--dataset_category given to launch_train.sh — set "
                                                               "DATASET_CAT instead (DATASET_CAT=..."),
])
def test_launcher_stops_bad_input_with_one_line_before_starting_processes(variables, message):
    """ARGS: arguments after the script's name (where --model would name the run after MODEL's default)."""
    environment = {name: value for name, value in variables.items() if name != "ARGS"}
    result = run_launcher(*variables.get("ARGS", "").split(),
                          **{"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **environment})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def launch_on_tiny_dataset(tmp_path, **variables) -> subprocess.CompletedProcess:
    """launch_train.sh on the 8-train-sample tiny dataset, run folder tmp_path/run."""
    from tests.tiny_data import tiny_dataset

    folder = tmp_path / "Musical_Instruments_0_2022-10-2023-10"
    tiny_dataset().save_to_disk(str(folder))
    return run_launcher(PYTHON=sys.executable, OMP_NUM_THREADS="1", DATASET_DIR=str(folder),
                        RUN_NAME=str(tmp_path / "run"), **variables)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_launcher_refuses_several_processes_without_a_gpu(tmp_path):
    result = launch_on_tiny_dataset(tmp_path, TRAIN_BATCH_SIZE="1", NUM_PROCESSES="2")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: NUM_PROCESSES=2 but no GPU visible")


def test_launcher_checks_the_train_split_against_every_process_batch(tmp_path):
    """8 train samples hold one batch of 3 users on one process, not on three."""
    result = launch_on_tiny_dataset(tmp_path, TRAIN_BATCH_SIZE="3", NUM_PROCESSES="3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the train split has 8 samples, fewer than one batch of 9 (--train_batch_size × processes) — "
        "use a smaller batch or a larger dataset"]


def test_check_only_wants_a_gpu_per_process(monkeypatch):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    train.check_gpus_per_machine(1)
    with pytest.raises(UserError, match=r"NUM_PROCESSES=3 but 1 GPU\(s\) visible \(CUDA_VISIBLE_DEVICES=0\)"):
        train.check_gpus_per_machine(3)


def test_several_processes_without_a_gpu_are_refused_unless_the_cpu_is_meant(monkeypatch):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    train.check_gpus_per_machine(1, cpu_fallback=True)  # one process: the warning only
    train.check_gpus_per_machine(3, cpu_fallback=False)  # --use_cpu True
    with pytest.raises(UserError, match=re.escape("NUM_PROCESSES=3 but no GPU visible (CUDA_VISIBLE_DEVICES=0,1,2,3) "
                                                  "— check CUDA_VISIBLE_DEVICES and the CUDA install, or pass "
                                                  "--use_cpu True")):
        train.check_gpus_per_machine(3, cpu_fallback=True)


def test_use_cpu_false_without_a_gpu_is_refused(monkeypatch):
    """The user asked for a GPU: not training on the CPU instead, silently (nor with a warning)."""
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    assert train.parse_config([]).use_cpu is True and train.parse_config(["--use_cpu", "True"]).use_cpu is True
    for flags in (["--use_cpu", "False"], ["--use_cpu=false", "--bf16", "False"]):  # float32: transformers accepts it
        with pytest.raises(UserError, match=re.escape("--use_cpu False, but no GPU is visible — check "
                                                      "CUDA_VISIBLE_DEVICES and the CUDA install")):
            train.parse_config(flags)


def test_negative_flags_say_what_they_do(capsys):
    assert train.parse_config(["--no_bf16"]).bf16 is False and train.parse_config([]).bf16 is True
    assert train.parse_config(["--no_load_best_model_at_end"]).load_best_model_at_end is False
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no_bf16, --no-bf16 Turn --bf16 off. " in help_text
    assert "--no_gradient_checkpointing, --no-gradient-checkpointing Turn --gradient_checkpointing off. " in help_text


FAILING_PROCESS = """import os, signal, sys, time
rank = int(os.environ.get("RANK", "0"))
if rank == int(sys.argv[1]):
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "exit1":
        os._exit(1)
    if sys.argv[2] == "wait":  # as train.py waits, SIGTERM as it handles it
        sys.path.insert(0, os.getcwd())  # the repository
        import errors
        print("started", flush=True)
        errors.run_cli(time.sleep, 60, interrupt_on_sigterm=not errors.launched())
    print("error: process", rank, "refuses", file=sys.stderr)
    sys.exit(2)
"""


def launch_failing(tmp_path, processes, failing_rank, how, **kwargs):
    """What launch_train.sh starts the processes with, on processes that fail as `how` says."""
    script = tmp_path / "fails.py"
    script.write_text(FAILING_PROCESS)
    multi = ["--multi_gpu"] if processes > 1 else []
    return kwargs.pop("start", subprocess.run)(
        [sys.executable, "launch.py", *multi,
         "--num_processes", str(processes), "--main_process_port", train.free_port(), str(script),
         str(failing_rank), how],
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, cwd=ROOT, text=True, **kwargs)


@pytest.mark.parametrize("processes, failing_rank, how, code, last_line", [
    (1, 0, "error", 2, "error: process 0 refuses"),
    (2, 1, "error", 2, "error: process 1 refuses"),
    (2, 1, "kill", 128 + 9, "error: training process 1 was killed by SIGKILL — most often the machine's memory"),
    (2, 1, "exit1", 1, "error: training process 1 exited with code 1 — see its output above"),
])
def test_a_failed_training_process_ends_the_launch_with_its_own_line_and_code(
        tmp_path, processes, failing_rank, how, code, last_line):
    """No launcher traceback or log after the failed process's error line, and the process's exit
    code (128 + signal when killed); a line where the process could not say why it stopped."""
    result = launch_failing(tmp_path, processes, failing_rank, how, capture_output=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(last_line), result.stderr[-2000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_launch_stopped_by_sigterm_says_so_in_one_line(tmp_path, processes):
    """A scheduler's time limit: the training processes keep SIGTERM's default and say nothing.
    (accelerate 1.15 raised the signal from several processes, and left a single one running.)"""
    launch = launch_failing(tmp_path, processes, 0, "wait", start=subprocess.Popen, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert launch.stdout.readline().strip() == "started"
    launch.send_signal(signal.SIGTERM)
    _, stderr = launch.communicate(timeout=60)
    assert launch.returncode == 128 + 15
    assert stderr.strip().splitlines() == ["error: training stopped by SIGTERM sent to the launcher (a time limit?) — "
                                           "resume with --resume_from_checkpoint last"]


SAVED_ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
gpu_ids: '0'
mixed_precision: fp16
num_machines: 1
num_processes: 8
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_the_launch_ignores_a_saved_accelerate_config(tmp_path, processes):
    """A left-over `accelerate config` (here one GPU id for a multi-GPU run, which made accelerate
    raise, and fp16) changes nothing: the processes start as launch_train.sh says."""
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "default_config.yaml").write_text(SAVED_ACCELERATE_CONFIG)
    script = tmp_path / "show.py"
    # one write per process: print's pieces from two processes can interleave on the shared pipe
    script.write_text("import os\nline = f\"{os.environ.get('WORLD_SIZE')} {os.environ['ACCELERATE_MIXED_PRECISION']}\\n\"\n"
                      "os.write(1, line.encode())")
    multi = ["--multi_gpu"] if processes > 1 else []
    result = subprocess.run(
        [sys.executable, "launch.py", *multi,
         "--num_processes", str(processes), "--main_process_port", train.free_port(), str(script)],
        env={**os.environ, "HF_HOME": str(tmp_path), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    world_size = str(processes) if processes > 1 else "None"
    assert result.stdout.splitlines() == [f"{world_size} no"] * processes


@pytest.mark.parametrize("machine_rank, cause", [
    (0, "Timed out after"),  # node 0, the other node never came
    (1, "The client socket has timed out after 3000ms while trying to connect to (127.0.0.1, "),  # no node 0 there
])
def test_nodes_that_never_meet_end_in_one_line(tmp_path, machine_rank, cause):
    """Without the C++ stack trace torch prints at each retry to reach node 0 (every second, for
    the whole rendezvous timeout)."""
    script = tmp_path / "never_runs.py"
    script.write_text("raise SystemExit(5)")
    port = train.free_port()
    result = subprocess.run(
        [sys.executable, "launch.py", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip",
         "127.0.0.1", "--main_process_port", port, "--rdzv_conf", "timeout=3", str(script)],
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True,
        text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: the training processes did not meet at 127.0.0.1:{port} ({cause}")
    assert lines[0].endswith("— start launch_train.sh on every node with node 0's address (reachable from the "
                             "others) as MAIN_PROCESS_IP, the same MAIN_PROCESS_PORT and NUM_MACHINES, and its own "
                             "MACHINE_RANK")
