#!/usr/bin/env bash
# POC mode on one workstation in one command: set up, build the demo set if needed, then prepare a POC with
# one FLARE client per site, start it, submit LC-Fed, wait, write runs/poc/results and stop the POC.
# Extra arguments go to `python -m lcfed poc run` (e.g. --rounds 4, --console, --data DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f data/demo/dataset.json ]; then
  python -m lcfed data demo --out data/demo
fi
args=("$@")
case " ${args[*]-} " in *" --data "*) ;; *) args+=(--data data/demo) ;; esac
python -m lcfed poc run --workspace runs/poc "${args[@]}"
