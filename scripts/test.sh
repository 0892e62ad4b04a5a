#!/usr/bin/env bash
# Quick start 2/2 (and what CI runs): set up, then run the test suite. Extra arguments go to pytest
# (e.g. -m "not e2e" for the unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q "$@"
