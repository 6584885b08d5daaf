#!/usr/bin/env bash
# Wheels for a GPU machine without network whose python3 (3.12) already holds a CUDA torch,
# torchvision, torchmetrics, transformers and typer: what fmconvert needs besides, into .whl/
# (git-ignored), for scripts/gpu_check.sh. huggingface_hub travels too: diffusers 0.42 needs
# >= 1.32, the image's transformers < 2.0 (so not this venv's 2.x); and safetensors >= 0.8.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 torch-fidelity==0.4.0 importlib_metadata==10.2.0 \
  huggingface_hub==1.33.0 hf-xet==1.8.0 safetensors==0.8.0
ls -l .whl
