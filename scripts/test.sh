#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (pip, package registries only) and runs the suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# one pytest-xdist worker a core (each at one torch thread: tests/conftest.py); -n 0 runs in this process alone
exec python -m pytest -n auto --dist worksteal "$@"
