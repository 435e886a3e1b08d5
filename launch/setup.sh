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
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$TORCH_EXTENSIONS_DIR"
pip_install() {
  # (keep pip's byte-compiling: with PYTHONDONTWRITEBYTECODE=1, as on this machine, nothing else writes .pyc and
  # every later import would compile from source: measured 20.7 s instead of 9-12 s per training process)
  # (this machine's pip config lists extra local indexes; their "Location ... is ignored" chatter is dropped)
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt "$@" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[setup] pip install failed"; exit 1; }
}

# DeepSpeed JIT-compiles its CPU ops on first use (30-120 s each); they are built once into a folder the venv owns,
# in the background, as soon as torch and DeepSpeed are installed, so the compile overlaps the rest of the install.
# shm_comm (DeepSpeed's CPU communication op, used by every DeepSpeed run) is always built and waited for.
# async_io (NVMe offload, profile zero3_nvme) is left to its first use (it costs 4-6 min on one core) unless
# TERRASCALE_BUILD_AIO=background (what .ci/run sets): then it goes on compiling, on one core, after setup returns;
# a run that needs the op meanwhile waits for torch's build lock, then loads it.
start_op_builds() {
  if [ ! -f .venv/.ds-ops-built ]; then
    echo "[setup] building DeepSpeed's CPU communication op in the background"
    MAX_JOBS=1 .venv/bin/python - > .venv/torch_extensions/shm_comm.log 2>&1 <<'PY' &
import pathlib
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

builder = ShareMemCommBuilder()
if builder.is_compatible(verbose=False):
    builder.load(verbose=False)
    print(f"[ops] built {builder.name}")
else:
    print(f"[ops] {builder.name} not buildable here (skipped)")
pathlib.Path(".venv/.ds-ops-built").touch()
PY
    shm_pid=$!
  fi
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
}

# ZeRO-Infinity (profile zero3_nvme) needs DeepSpeed's async_io op, which needs libaio. Optional: without it
# every other profile works and zero3_nvme says why it cannot run.
if [ ! -e /usr/include/libaio.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing libaio-dev for NVMe offload"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev) >/dev/null 2>&1 \
    || echo "[setup] libaio-dev could not be installed: profile zero3_nvme will be unavailable"
fi

shm_pid=
stamp=.venv/.terrascale-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing (torch/torchvision pinned by constraints.txt; ~2 min on a fresh machine)"
  # The constraints file stops pip from swapping torch for another build while resolving DeepSpeed/TerraTorch.
  # torch and DeepSpeed first (DeepSpeed's requirement as pyproject.toml states it), so the ops compile meanwhile.
  deepspeed_req=$("$PY" -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("deepspeed")))')
  pip_install "$(grep -m1 '^torch==' constraints.txt)" "$deepspeed_req"
  start_op_builds
  pip_install -e ".[test]"
  echo "$want" > "$stamp"
else
  start_op_builds
fi
# `accelerate launch` passes training's exit code and SIGTERM/SIGINT through only with terrascale's launcher hook
# (a .pth file in the venv; trainer/launch_hook.py says what it does). Cheap and idempotent: always checked.
.venv/bin/python -m trainer.launch_hook install
if [ -n "$shm_pid" ]; then
  # not fatal (DeepSpeed then communicates without it, slower), but said, and retried by the next setup
  wait "$shm_pid" || echo "[setup] WARNING: DeepSpeed's CPU communication op did not build: see .venv/torch_extensions/shm_comm.log"
  grep -h "^\[ops\]" .venv/torch_extensions/shm_comm.log || true
fi
echo "[setup] ready: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(" | ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "accelerate", "terratorch")))')"
