#!/usr/bin/env bash
# Command one of the README: install (into .venv), preprocess the sample, train, evaluate, show.
# Usage: bash quickstart.sh [--seed N] [--steps N] [--eval_samples N] [--output_dir DIR] [--model NAME] [--float32]
# It runs from the repository folder: a relative --output_dir is read from there.
set -euo pipefail
cd "$(dirname "$0")"
bash setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python quickstart.py "$@"
