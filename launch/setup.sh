#!/usr/bin/env bash
# Create ./.venv and install terrascale with its pinned dependencies. Idempotent: a second run only
# reinstalls when pyproject.toml or constraints.txt changed. Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "terrascale needs Python 3.11 (found %s)" % sys.version.split()[0]'

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.terrascale-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing (torch/torchvision pinned by constraints.txt; ~3 min on a fresh machine)"
  # The constraints file stops pip from swapping torch for another build while resolving DeepSpeed/TerraTorch.
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
# DeepSpeed JIT-compiles its CPU ops on first use; keep them in a folder the venv owns.
mkdir -p .venv/torch_extensions
echo "[setup] ready: $(.venv/bin/python -c 'import torch, deepspeed, terratorch; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| terratorch", terratorch.__version__)' 2>/dev/null | tail -1)"
