#!/usr/bin/env bash
# The main command: on a fresh machine, sets itself up, converts builtin:digits-eps into a
# flow-matching pipeline, and writes the whole story to report/: the converted model's Euler
# samples beside the source's own DDIM samples from the same seeds, the field agreement with
# the source (and with builtin:digits-flow), and an FID sweep against the DDIM baseline.
#   scripts/demo.sh [OUT=report]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
OUT=${1:-report}
fmconvert report builtin:digits-eps --other builtin:digits-flow --out "$OUT" --force
echo "open $OUT/report.md"
