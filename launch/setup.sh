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
  # (this machine's pip config lists extra local indexes; their "Location ... is ignored" chatter is dropped)
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[setup] pip install failed"; exit 1; }
  echo "$want" > "$stamp"
fi
# `accelerate launch` passes training's exit code and SIGTERM/SIGINT through only with terrascale's launcher hook
# (a .pth file in the venv; trainer/launch_hook.py says what it does). Cheap and idempotent: always checked.
.venv/bin/python -m trainer.launch_hook install
# ZeRO-Infinity (profile zero3_nvme) needs DeepSpeed's async_io op, which needs libaio. Optional: without it
# every other profile works and zero3_nvme says why it cannot run.
if [ ! -e /usr/include/libaio.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing libaio-dev for NVMe offload"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev) >/dev/null 2>&1 \
    || echo "[setup] libaio-dev could not be installed: profile zero3_nvme will be unavailable"
fi
# DeepSpeed JIT-compiles its CPU ops on first use (30-120 s each); build them once into a folder the venv owns.
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$TORCH_EXTENSIONS_DIR"
if [ ! -f .venv/.ds-ops-built ]; then
  # async_io (NVMe offload only) is left to its first use: it costs 2-5 min to compile.
  echo "[setup] building DeepSpeed's CPU communication op once (~1 min)"
  .venv/bin/python - <<'PY' 2>&1 | grep -E "^\[ops\]" || true
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

for builder in (ShareMemCommBuilder(),):
    if builder.is_compatible(verbose=False):
        builder.load(verbose=False)
        print(f"[ops] built {builder.name}")
    else:
        print(f"[ops] {builder.name} not buildable here (skipped)")
PY
  touch .venv/.ds-ops-built
fi
# TERRASCALE_BUILD_AIO=background (what .ci/run sets) compiles async_io now, on one core, while the caller goes
# on; it measured 5-13 min here. A run that needs the op meanwhile waits for torch's build lock, then loads it.
if [ "${TERRASCALE_BUILD_AIO:-}" = background ] && [ ! -f .venv/.ds-aio-built ] \
   && ! { [ -f .venv/.ds-aio-building ] && kill -0 "$(cat .venv/.ds-aio-building)" 2>/dev/null; }; then
  echo "[setup] building DeepSpeed's async_io op in the background (log: .venv/torch_extensions/async_io.log)"
  MAX_JOBS=1 nohup .venv/bin/python -c '
import pathlib, sys, time
from deepspeed.ops.op_builder import AsyncIOBuilder
t0 = time.time()
builder = AsyncIOBuilder()
if not builder.is_compatible(verbose=False):
    sys.exit("[ops] async_io not buildable here (no libaio): profile zero3_nvme will say so")
builder.load(verbose=False)
pathlib.Path(".venv/.ds-aio-built").touch()
print(f"[ops] built async_io in {time.time() - t0:.0f} s")
' > .venv/torch_extensions/async_io.log 2>&1 < /dev/null &
  echo $! > .venv/.ds-aio-building
fi
echo "[setup] ready: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(" | ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "accelerate", "terratorch")))')"
