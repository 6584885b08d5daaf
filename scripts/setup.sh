# Sourced by scripts/test.sh and scripts/demo.sh: a .venv with fmconvert installed, made on
# first use with pip from the package registries only. Extras: $FMCONVERT_EXTRAS (default test).
# FMCONVERT_TORCH overrides the torch + torchvision requirement for a new venv. The default is a
# pair that works together here (torch-fidelity, behind Inception FID, needs torchvision): on
# x86_64 torch 2.14.1 + torchvision 0.29.1 (this machine's pip serves both from local disk), on
# aarch64 torch 2.9.1 + torchvision 0.24.1. On a GPU cluster pick your own, e.g. FMCONVERT_TORCH=torch.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) default_torch="torch==2.9.1 torchvision==0.24.1" ;;
    *) default_torch="torch==2.14.1 torchvision==0.29.1" ;;
  esac
  # shellcheck disable=SC2086
  python -m pip install -q ${FMCONVERT_TORCH:-$default_torch} 2>&1 | grep -v "^WARNING: Location" >&2 || true
fi
# a torch range that the installed torch satisfies installs nothing more
python -m pip install -q -e ".[${FMCONVERT_EXTRAS:-test}]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
python -c "import fmconvert" || { echo "setup failed: fmconvert does not import" >&2; exit 1; }
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
