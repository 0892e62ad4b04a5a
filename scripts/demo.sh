#!/usr/bin/env bash
# Quick start 1/2: set up, build the embedded 4-site demo set, run LC-Fed in FLARE's simulator and
# print each site's test metrics. Extra arguments go to `python -m lcfed run` (e.g. --rounds 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f data/demo/dataset.json ]; then
  python -m lcfed data demo --out data/demo
fi
python -m lcfed run --algo lcfed --data data/demo --workspace runs/lcfed-demo --overwrite "$@"
