#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (pip, package registries only) and runs the suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec python -m pytest "$@"
