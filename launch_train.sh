#!/usr/bin/env bash
# Train R²ec with RecPO on several GPUs: accelerate + DeepSpeed ZeRO-2 (ds_config.json), SPEC §6.
#   bash launch_train.sh                                   # 3 training processes on GPUs 0-3
#   MODEL=qwen DATASET_CAT=CDs_and_Vinyl bash launch_train.sh
#   CUDA_VISIBLE_DEVICES=0 NUM_PROCESSES=1 bash launch_train.sh --max_steps 100   # one GPU
# Every variable below can be set from the environment; extra arguments go to train.py. It runs
# from the repository folder: relative paths (DATASET_DIR, MODEL, --output_dir, ...) are read from there.
set -euo pipefail
cd "$(dirname "$0")"

CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0,1,2,3}  # set but empty (no GPU) is kept
NUM_PROCESSES=${NUM_PROCESSES:-3}          # the released setup kept the fourth GPU for its rollout engine
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-20138}
NUM_MACHINES=${NUM_MACHINES:-1}            # multi-node: same script on every node with its MACHINE_RANK
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
DATASET_CAT=${DATASET_CAT:-Musical_Instruments}
DATASET_DIR=${DATASET_DIR:-data/${DATASET_CAT}_0_2022-10-2023-10}
MODEL=${MODEL:-gemma}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-4}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-32}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-640}
WARMUP_STEPS=${WARMUP_STEPS:-32}
NUM_TRAIN_EPOCHS=${NUM_TRAIN_EPOCHS:-3}
GROUP_SIZE=${GROUP_SIZE:-4}
RELABEL_TOPK=${RELABEL_TOPK:-2}
GEN_TEMPERATURE=${GEN_TEMPERATURE:-2.0}
GEN_TOP_K=${GEN_TOP_K:-50}
SEED=${SEED:-42}
RUN_NAME=${RUN_NAME:-r2ec_$(basename "$MODEL")_${DATASET_CAT}}  # a folder or hub id as MODEL: its last part
DS_CONFIG=${DS_CONFIG:-ds_config.json}
PYTHON=${PYTHON:-python}

if ! command -v "$PYTHON" >/dev/null; then
    echo "error: PYTHON=$PYTHON is not a command — activate the project's environment (. .venv/bin/activate) or set PYTHON" >&2
    exit 2
fi
PACKAGES="torch transformers accelerate deepspeed datasets peft"
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(p) is None for p in sys.argv[1:]))" \
        $PACKAGES >/dev/null 2>&1; then
    echo "error: PYTHON=$PYTHON lacks some of $PACKAGES — activate the project's environment (. .venv/bin/activate) or set PYTHON" >&2
    exit 2
fi
for arg in "$@"; do
    if [ "$arg" = --help ] || [ "$arg" = -h ]; then
        exec "$PYTHON" train.py --help  # once, not once per process
    fi
done
for arg in "$@"; do  # these two also name the run's folder (RUN_NAME), before the arguments are read
    case "$arg" in
        --model|--model=*) variable=MODEL ;;
        --dataset_category|--dataset_category=*) variable=DATASET_CAT ;;
        *) continue ;;
    esac
    echo "error: ${arg%%=*} given to launch_train.sh — set $variable instead ($variable=... bash launch_train.sh): it also names the run's folder" >&2
    exit 2
done
for name in DATASET_CAT DATASET_DIR MODEL RUN_NAME DS_CONFIG; do  # passed as a flag's value
    if [[ ${!name} == -* ]]; then
        echo "error: $name=${!name} starts with '-', which train.py would read as a flag — rename it (a path: ./${!name})" >&2
        exit 2
    fi
done
for name in NUM_PROCESSES NUM_MACHINES; do
    if ! [[ ${!name} =~ ^[1-9][0-9]{0,5}$ ]]; then  # no leading 0: bash would read 010 as octal
        echo "error: $name=${!name} is not a positive whole number — fix it in the environment" >&2
        exit 2
    fi
done
if ! [[ $MAIN_PROCESS_PORT =~ ^[1-9][0-9]{0,4}$ ]] || [ "$MAIN_PROCESS_PORT" -gt 65535 ]; then
    echo "error: MAIN_PROCESS_PORT=$MAIN_PROCESS_PORT is not a port (1-65535) — fix it in the environment" >&2
    exit 2
fi
if ! [[ $MACHINE_RANK =~ ^(0|[1-9][0-9]{0,5})$ ]] || [ "$MACHINE_RANK" -ge "$NUM_MACHINES" ]; then
    echo "error: MACHINE_RANK=$MACHINE_RANK must be 0 to NUM_MACHINES-1 ($((NUM_MACHINES - 1))) — set it per node" >&2
    exit 2
fi
if [ "$NUM_MACHINES" -gt 1 ] && [[ $MAIN_PROCESS_IP =~ ^(127\.|localhost|::1$|0\.0\.0\.0$) ]]; then
    echo "error: NUM_MACHINES=$NUM_MACHINES with MAIN_PROCESS_IP=$MAIN_PROCESS_IP — set it to node 0's address, the same on every node" >&2
    exit 2
fi
TOTAL_PROCESSES=$((NUM_PROCESSES * NUM_MACHINES))
if [ "$TOTAL_PROCESSES" -gt 1 ] && [ "$MACHINE_RANK" = 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$MAIN_PROCESS_PORT") 2>/dev/null; then
    echo "error: port $MAIN_PROCESS_PORT is in use (another run on this machine?) — set MAIN_PROCESS_PORT to a free one" >&2
    exit 2
fi
export CUDA_VISIBLE_DEVICES
TRAIN_ARGS=(
    --deepspeed "$DS_CONFIG"
    --model "$MODEL"
    --dataset_dir "$DATASET_DIR"
    --dataset_category "$DATASET_CAT"
    --train_batch_size "$TRAIN_BATCH_SIZE"
    --eval_batch_size "$EVAL_BATCH_SIZE"
    --max_new_tokens "$MAX_NEW_TOKENS"
    --warmup_steps "$WARMUP_STEPS"
    --num_train_epochs "$NUM_TRAIN_EPOCHS"
    --group_size "$GROUP_SIZE"
    --trainer_relabel_topk "$RELABEL_TOPK"
    --gen_temperature "$GEN_TEMPERATURE"
    --gen_top_k "$GEN_TOP_K"
    --seed "$SEED"
    --run_name "$RUN_NAME"
    "$@"
)
# Bad flags, a missing dataset, a placeholder or unloadable backbone, LoRA targets it lacks, more
# processes than GPUs: one error line here, instead of one per process and the launcher's traceback.
env OMP_NUM_THREADS=1 R2EC_PROCESSES="$TOTAL_PROCESSES" R2EC_PROCESSES_PER_MACHINE="$NUM_PROCESSES" \
    "$PYTHON" train.py "${TRAIN_ARGS[@]}" --check_only True >/dev/null
# The Trainer sets DeepSpeed up from --deepspeed; accelerate only starts the processes.
# --multi_gpu also makes `accelerate launch` start several processes on CPU (ACCELERATE_USE_CPU=true).
MULTI=()
if [ "$TOTAL_PROCESSES" -gt 1 ]; then
    MULTI=(--multi_gpu)
fi
if [ "$NUM_MACHINES" -gt 1 ]; then
    echo "node $MACHINE_RANK of $NUM_MACHINES: waiting for the others at $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"
fi
# launch.py: `accelerate launch`, whose failures end with the failed process's own error line.
exec "$PYTHON" launch.py "${MULTI[@]}" \
    --num_processes "$TOTAL_PROCESSES" --num_machines "$NUM_MACHINES" \
    --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    train.py "${TRAIN_ARGS[@]}"
