#!/usr/bin/env bash
# Command two of the README: install what is needed and run the whole test suite (offline).
# Usage: bash run_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")"
bash setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One thread per process: the tests start several processes, and 2-core machines thrash otherwise.
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q tests "$@"
