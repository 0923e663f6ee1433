#!/usr/bin/env bash
# Time RecPO training steps at the real size on one GPU: a Qwen2.5-3B-shaped backbone with random
# bf16 weights and the real Qwen2.5 tokenizer, the shipped sample data, `train.py` under
# `accelerate launch` with DeepSpeed ZeRO-2 (ds_config.json), the launcher's RecPO settings
# (B 4, G 4, 640 new tokens, temperature 2.0, top-k 50), 4 steps and one evaluation of 64 valid
# + 64 test samples. Random weights rarely write `<answer>`, so every rollout runs the full 640
# tokens: the worst case. Then, while time is left, bench/bench_update.py times the update alone
# on the same backbone and prints a profile of one call (into the log).
#
# On the lent GPU machine (python3 with torch/transformers/accelerate/peft, no datasets, no
# deepspeed, no internet), from the repo root, with `.whl` (wheels) and `.gpu` (the tokenizer, and
# the sample preprocessed here as a fallback should preprocess.py fail there) carried:
#     bash bench/gpu_train_step.sh
# It writes into $OUT (at most 6 small files, no weights): gpu_train_step.log (everything, each
# line stamped with seconds since the start), gpu_step_table.md (per-step times, peak memory,
# evaluation time), trainer_state.json, final_results.json, reasoning_sample.jsonl, nvidia_smi.csv.
#
# CPU dry run (tiny 2-layer Qwen2, 16 new tokens, 2 steps, 8 eval samples), e.g. here, where .venv
# has datasets and deepspeed and .whl's Python 3.12 wheels do not install (1 min 45 s, 2026-11-29):
#     mkdir -p /tmp/whl && cp .whl/hjson-*.whl /tmp/whl
#     R2EC_GPU_SMOKE=1 PYTHON=$PWD/.venv/bin/python WHL_DIR=/tmp/whl SITE=/tmp/site OUT=/tmp/smoke bash bench/gpu_train_step.sh
# Variables: OUT, PYTHON (python3), WHL_DIR (.whl), SITE (/tmp/site), TOKENIZER_DIR
# (.gpu/qwen2.5-tokenizer), WORK (/tmp/r2ec_gpu: model, data, run folder), R2EC_GPU_DEADLINE_S
# (390: training is stopped so that the script ends by then), MAX_STEPS, MASTER_PORT.
set -uo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s.%N)
SMOKE=${R2EC_GPU_SMOKE:-0}
OUT=${OUT:-/tmp/gpu_train_step_out}
PY=${PYTHON:-python3}
WHL_DIR=${WHL_DIR:-.whl}
SITE=${SITE:-/tmp/site}
TOKENIZER_DIR=${TOKENIZER_DIR:-.gpu/qwen2.5-tokenizer}
WORK=${WORK:-/tmp/r2ec_gpu}
DEADLINE_S=${R2EC_GPU_DEADLINE_S:-390}
MODEL_DIR=$WORK/qwen3b
DATA_ROOT=$WORK/data
RUN_DIR=$WORK/run
DATASET_DIR=$DATA_ROOT/Video_Games_0_2022-10-2023-10
LOG=$OUT/gpu_train_step.log
mkdir -p "$OUT"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
# One process, launched like `accelerate launch --multi_gpu` launches each of its processes: with
# these set, accelerate initialises DeepSpeed's process group itself (NCCL, no MPI discovery).
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29531}

if [ "$SMOKE" = 1 ]; then
    MODEL_FLAGS=(--tiny)
    RUN_FLAGS=(--max_new_tokens 16 --max_steps "${MAX_STEPS:-2}" --eval_steps "${MAX_STEPS:-2}"
               --max_eval_samples 8 --eval_batch_size 8)
    UPDATE_NEW_TOKENS=16
else
    MODEL_FLAGS=(--std 0.02)
    RUN_FLAGS=(--max_new_tokens 640 --max_steps "${MAX_STEPS:-4}" --eval_steps "${MAX_STEPS:-4}"
               --max_eval_samples 64 --eval_batch_size 32)
    UPDATE_NEW_TOKENS=640
fi

elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%d", $1 - $2}'; }
stage() { echo "=== [$(elapsed) s] $*"; }

main() {
    rm -f "$WORK/fallback"
    stage "install carried wheels ($WHL_DIR) into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL_DIR"/*.whl \
        || { echo "error: wheel install failed"; return 10; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

    stage "environment"
    "$PY" - <<'EOF' || { echo "error: imports failed"; return 11; }
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("transformers", "accelerate", "peft", "datasets", "deepspeed", "pydantic", "huggingface_hub",
             "tokenizers", "pyarrow", "pandas", "numpy", "typing_extensions"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')}  ({module.__file__})")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

    stage "random backbone -> $MODEL_DIR"
    rm -rf "$MODEL_DIR" "$RUN_DIR"
    "$PY" bench/make_random_backbone.py --tokenizer "$TOKENIZER_DIR" --out "$MODEL_DIR" "${MODEL_FLAGS[@]}" \
        || { echo "error: backbone build failed"; return 12; }

    stage "preprocess the shipped sample -> $DATASET_DIR"
    mkdir -p "$DATA_ROOT"
    cp data/sample/Video_Games.csv.gz data/sample/meta_Video_Games.jsonl.gz "$DATA_ROOT"/
    if ! "$PY" preprocess.py --category Video_Games --data_root_dir "$DATA_ROOT"; then
        # Still time the steps: use the same dataset as preprocessed here (carried in .gpu/).
        echo "WARNING: preprocess.py failed on this machine; using the carried .gpu/$(basename "$DATASET_DIR")"
        rm -rf "$DATASET_DIR" && cp -r ".gpu/$(basename "$DATASET_DIR")" "$DATASET_DIR" || return 13
    fi

    train "$RUN_DIR" --deepspeed ds_config.json
    local rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "${R2EC_GPU_FALLBACK:-1}" = 1 ] \
            && [ $(( DEADLINE_S - $(elapsed) )) -gt 150 ]; then
        # One shot only: rather than come back empty, time the same steps without DeepSpeed (plain
        # single-process Trainer, no process group). The table says which run it shows.
        stage "FALLBACK: DeepSpeed run failed ($rc); the same run without DeepSpeed"
        echo "fallback without DeepSpeed after status $rc" > "$WORK/fallback"
        rm -rf "$RUN_DIR"
        ( unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT; train "$RUN_DIR" )
        rc=$?
    fi
    # The update alone, with a profile of one call (where its time goes), while time is left.
    local left=$(( DEADLINE_S - $(elapsed) - 15 ))
    if [ "$left" -gt 45 ]; then
        stage "bench/bench_update.py on the same backbone (stopped after ${left} s)"
        ( unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
          timeout --kill-after=5 "$left" "$PY" bench/bench_update.py --model "$MODEL_DIR" --dataset_dir "$DATASET_DIR" \
              --repeats 2 --profile --new_tokens "${UPDATE_NEW_TOKENS}" )
    fi
    return $rc
}

# train RUN_DIR [flags...]: train.py under accelerate launch, stopped when the time budget runs out.
train() {
    local run_dir=$1; shift
    local budget=$(( DEADLINE_S - $(elapsed) - 25 ))
    [ "$budget" -lt 30 ] && budget=30
    stage "train.py under accelerate launch $* (stopped after ${budget} s if still running)"
    local monitor=
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 2 > "$OUT/nvidia_smi.csv" &
        monitor=$!
    fi
    timeout --kill-after=10 "$budget" "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
        --dynamo_backend no train.py "$@" --bf16 True \
        --model "$MODEL_DIR" --dataset_dir "$DATASET_DIR" \
        --train_batch_size 4 --group_size 4 --micro_batch_size 4 --trainer_relabel_topk 2 \
        --gen_temperature 2.0 --gen_top_k 50 --warmup_steps 32 --seed 42 \
        --eval_on_start False --report_to none --logging_steps 1 --disable_tqdm True \
        --output_dir "$run_dir" --overwrite_output_dir True "${RUN_FLAGS[@]}"
    local rc=$?
    [ -n "$monitor" ] && kill "$monitor" 2>/dev/null
    stage "train.py exited with $rc$([ "$rc" = 124 ] && echo ' (stopped by the time budget)')"
    return $rc
}

# Every line stamped with seconds since the start, so step wall times can be read off the log.
stamp() {
    "$PY" -u -c '
import sys, time
t0 = float(sys.argv[1])
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    out.write(b"[%7.1fs] " % (time.time() - t0) + line)
    out.flush()
' "$T0"
}

main 2>&1 | stamp | tee "$LOG"
RC=${PIPESTATUS[0]}

# The table: trainer_state.json of the run (else its last checkpoint's, else the logged dicts).
cp "$RUN_DIR/trainer_state.json" "$OUT/" 2>/dev/null \
    || cp "$(ls -d "$RUN_DIR"/checkpoint-*/ 2>/dev/null | tail -1)trainer_state.json" "$OUT/" 2>/dev/null
cp "$RUN_DIR/final_results.json" "$OUT/" 2>/dev/null
head -n 2 "$(ls "$RUN_DIR"/reasoning/*valid*.jsonl 2>/dev/null | tail -1)" > "$OUT/reasoning_sample.jsonl" 2>/dev/null \
    || rm -f "$OUT/reasoning_sample.jsonl"
"$PY" - "$OUT" "$RC" "$SMOKE" "$WORK/fallback" <<'EOF' 2>&1 | tee -a "$LOG"
import ast, json, os, re, sys

out, rc, smoke, fallback = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]


def number(value):
    """Logged values as printed by transformers 5 are strings ('0.87'); trainer_state.json's are floats."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


state_file = os.path.join(out, "trainer_state.json")
stamped = []  # (seconds since start, logged dict) from the log
with open(os.path.join(out, "gpu_train_step.log"), errors="replace", newline="\n") as f:  # \r: progress bars
    for line in f:
        if "train.py under accelerate launch" in line:
            stamped = []  # only the last training attempt counts
        m = re.match(r"\[\s*([\d.]+)s\] .*?(\{'.*\})\s*$", line)  # progress bars may precede the dict
        if m:
            try:
                stamped.append((float(m[1]), {k: number(v) for k, v in ast.literal_eval(m[2]).items()}))
            except (ValueError, SyntaxError):
                pass
if os.path.isfile(state_file):
    history, source = json.load(open(state_file))["log_history"], "trainer_state.json"
else:
    history, source = [entry for _, entry in stamped], "the log (no trainer_state.json)"
step_logs = [e for e in history if "time/update_s" in e or "loss" in e]
evals = [e for e in history if "eval_seconds" in e]
final = next((e for e in reversed(history) if "train_runtime" in e), {})
# Wall time of a step: between its log line and the previous step's (step 1: unknown).
log_times = {}
for t, entry in stamped:
    if "time/update_s" in entry or "loss" in entry:
        log_times.setdefault(len(log_times) + 1, t)

def cell(value, fmt="{:.2f}"):
    return "–" if value is None else fmt.format(value)

stages = ("time/item_table_s", "time/rollout_s", "time/reward_s", "time/update_s")
rows = ["| step | item_table s | rollout s | reward s | update s | total (stages) s | wall since prev. step s "
        "| mean reasoning tokens | rollout tok/s | rollout log-prob gap | peak GiB |", "|" + "---|" * 11]
for i, e in enumerate(step_logs, 1):
    total = sum(e.get(k, 0.0) for k in stages)
    wall = log_times[i] - log_times[i - 1] if i in log_times and i - 1 in log_times else None
    length = e.get("completions/mean_length")
    tok_s = 16 * length / e["time/rollout_s"] if length and e.get("time/rollout_s") else None
    rows.append(f"| {e.get('step', i)} | " + " | ".join(cell(e.get(k)) for k in stages)
                + f" | {total:.2f} | {cell(wall, '{:.1f}')} | {cell(length, '{:.0f}')} | {cell(tok_s, '{:.0f}')}"
                + f" | {cell(e.get('rollout/logprob_gap'), '{:.3f}')} | {cell(e.get('memory/peak_gib'))} |")
lines = [f"# RecPO train step on one GPU ({'SMOKE, tiny model, CPU/GPU dry run' if smoke else 'Qwen2.5-3B shape, random bf16 weights'})",
         "", f"train.py exit status {rc}; values from {source}."]
if os.path.isfile(fallback):
    lines.append(f"**Without DeepSpeed**: {open(fallback).read().strip()} (see the log for why).")
lines += [""] + rows + [""]
for e in evals:
    lines.append(f"- evaluation at step {e.get('step', '?')}: eval_seconds {e['eval_seconds']:.1f} "
                 f"(valid reasoning length {cell(e.get('eval_valid_reasoning_length'), '{:.0f}')}, "
                 f"test {cell(e.get('eval_test_reasoning_length'), '{:.0f}')})")
if not evals:
    lines.append("- no evaluation logged")
if final:
    lines.append(f"- train_runtime {final['train_runtime']:.1f} s (training loop incl. evaluation and checkpoint)")
skipped = [e.get("step") for e in step_logs if e.get("skipped_steps")]
if skipped:
    lines.append(f"- SKIPPED steps (OOM or non-finite): {skipped}")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "gpu_step_table.md"), "w").write(text)
print(text)
EOF
echo "[$(elapsed)s] done: train.py status $RC; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$RC"
