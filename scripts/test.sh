#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (pip, package registries only) and runs the suite.
#   scripts/test.sh [pytest args...]
# FMCONVERT_TORCH overrides the torch requirement installed into a new venv (default: the CPU
# build this project's machines serve, torch==2.13.0; on a GPU box use e.g. FMCONVERT_TORCH=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${FMCONVERT_TORCH:-torch==2.13.0}"
fi
# a range that the installed torch satisfies installs nothing more
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec python -m pytest "$@"
