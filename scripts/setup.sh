# Sourced by scripts/test.sh and scripts/demo.sh: a .venv with fmconvert installed, made on
# first use with pip from the package registries only. Extras: $FMCONVERT_EXTRAS (default test).
# FMCONVERT_TORCH overrides the torch requirement for a new venv (default: the CPU build this
# project's machines serve, torch==2.13.0; on a GPU machine e.g. FMCONVERT_TORCH=torch).
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${FMCONVERT_TORCH:-torch==2.13.0}"
fi
# a torch range that the installed torch satisfies installs nothing more
python -m pip install -q -e ".[${FMCONVERT_EXTRAS:-test}]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
python -c "import fmconvert" || { echo "setup failed: fmconvert does not import" >&2; exit 1; }
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
