#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned requirements and the bundle. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import lcfed, nvflare, monai, nilearn" >/dev/null 2>&1 || [ requirements.txt -nt .venv/.installed ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r requirements.txt
  touch .venv/.installed
fi
python - <<'PY'
import nvflare, torch, monai
print(f"environment ready: python {__import__('sys').version.split()[0]}, nvflare {nvflare.__version__}, "
      f"torch {torch.__version__} ({'CUDA' if torch.cuda.is_available() else 'CPU'}), monai {monai.__version__}")
PY
