#!/usr/bin/env bash
# Build what bench/gpu_train_step.sh carries to the lent GPU machine (its image has no datasets,
# no deepspeed and no internet): `.whl/` (the missing wheels, Python 3.12 manylinux) and `.gpu/`
# (Qwen2.5's tokenizer with its chat template, and the sample preprocessed here as a fallback).
# Both folders are git-ignored through .git/info/exclude. Run from anywhere, on this machine:
#     bash bench/prepare_gpu_carry.sh
# then call the device tool with carry [".whl", ".gpu"] and `bash bench/gpu_train_step.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .git/info && touch .git/info/exclude  # a fresh clone may have neither
for ignored in /.whl/ /.gpu/; do grep -qxF "$ignored" .git/info/exclude || echo "$ignored" >> .git/info/exclude; done
rm -rf .whl .gpu && mkdir -p .whl .gpu

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
"$PY" -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl  # sdist only on PyPI; pure Python

"$PY" -c "
import sys; sys.path.insert(0, '.')
from tests.backbones import _qwen2_tokenizer
_qwen2_tokenizer().save_pretrained('.gpu/qwen2.5-tokenizer')"

raw=$(mktemp -d)
cp data/sample/*.gz "$raw"/
"$PY" preprocess.py --category Video_Games --data_root_dir "$raw" >/dev/null
mv "$raw/Video_Games_0_2022-10-2023-10" .gpu/ && rm -rf "$raw"
du -sh .whl .gpu
