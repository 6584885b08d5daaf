#!/usr/bin/env bash
# One script for a lent GPU (fits in 10 minutes on one H200): the CUDA-marked tests, then the
# benchmark on CUDA in bfloat16 (cifar10-size UNet, the zoo, a Stable Diffusion 1.5-size
# UNet2DConditionModel with random weights), writing BENCHMARKS-gpu.md (and $OUT/ if set).
#   FMCONVERT_TORCH="torch" scripts/gpu_check.sh      # a CUDA torch on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
export FMCONVERT_TORCH=${FMCONVERT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
. scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -m pytest -q -m cuda tests/test_cuda.py
python scripts/bench.py --device cuda --dtype bfloat16 --repeats 10 --batch 64 --steps 50 --sd15 --out BENCHMARKS-gpu.md || true
if [ -n "${OUT:-}" ]; then cp BENCHMARKS-gpu.md "$OUT/"; fi
