#!/usr/bin/env bash
# One script for a lent GPU (fits in 10 minutes on one H200): the CUDA-marked tests, then the
# benchmark on CUDA in bfloat16 (cifar10-size UNet, the zoo, a Stable Diffusion 1.5-size
# UNet2DConditionModel with random weights), writing docs/benchmarks/BENCHMARKS-gpu.md (and into $OUT if set).
#
# Where the machine has a CUDA torch but no network (this workplace's H200: its python3 holds
# torch, torchvision, torchmetrics, transformers, typer), first run scripts/gpu_wheels.sh here
# and carry .whl: diffusers and torch-fidelity are installed from it into /tmp/site.
# Elsewhere (a GPU box with pip access) the usual .venv is made: FMCONVERT_TORCH="torch" picks
# the CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  PY=python3
else
  export FMCONVERT_TORCH=${FMCONVERT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
  . scripts/setup.sh
  PY=python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, diffusers, huggingface_hub; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'hub', huggingface_hub.__version__)"
OUT_DIR=${OUT:-.}
set +e
$PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT_DIR/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 420 $PY scripts/bench.py --device cuda --dtype bfloat16 --repeats 10 --batch 64 --steps 50 --sd15 \
  --fid-images 2000 --fid-repeats 2 --out docs/benchmarks/BENCHMARKS-gpu.md 2>&1 | tee "$OUT_DIR/gpu-bench.log"
bench=${PIPESTATUS[0]}
[ "$OUT_DIR" != "." ] && cp docs/benchmarks/BENCHMARKS-gpu.md "$OUT_DIR/" 2>/dev/null
echo "CUDA tests exit $tests, benchmark exit $bench"
exit $((tests != 0 ? tests : bench))
