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
# Packages are installed by uv (pinned in constraints.txt, itself installed by pip): it unpacks and byte-compiles
# in parallel, so the install takes ~36 s where pip took ~96 s on the 2-core CI machine (the same 157 packages at
# the same versions; about the same CPU, on both cores). uv does not read pip's configuration: pip's own index
# settings (`pip config list`: indexes, find-links, constraints, certificate, trusted hosts, timeout) are handed to
# it, and any other pip setting is named as not passed on. TERRASCALE_INSTALLER=pip installs with pip instead.
# (bytecode is compiled at install: with PYTHONDONTWRITEBYTECODE=1, as on this machine, nothing else writes .pyc and
# every later import would compile from source: measured 20.7 s instead of 9-12 s per training process)
pip_quiet() {
  # (this machine's pip config lists extra local indexes; their "Location ... is ignored" chatter is dropped)
  .venv/bin/pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  return "${PIPESTATUS[0]}"
}
uv_settings() {
  # pip's configuration as uv options, one per line; SSL_CERT_FILE=... / UV_HTTP_TIMEOUT=... lines are environment
  pip_quiet config list | .venv/bin/python -c '
import ast, sys
flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
        "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
env = {"cert": "SSL_CERT_FILE", "timeout": "UV_HTTP_TIMEOUT", "default-timeout": "UV_HTTP_TIMEOUT"}
ignored = {"disable-pip-version-check", "no-cache-dir", "quiet", "verbose", "progress-bar", "root-user-action"}
seen = set()
for line in sys.stdin:
    key, sep, value = line.strip().partition("=")
    if not sep:
        continue
    name = key.rsplit(".", 1)[-1]
    values = ast.literal_eval(value).split()
    if name in flag:
        for v in values:
            if (name, v) not in seen:
                seen.add((name, v))
                print(flag[name]); print(v)
    elif name == "no-index" and values and values[0].lower() in ("1", "true", "yes", "on"):
        print("--no-index")
    elif name in env:
        print(f"{env[name]}={values[0]}")
    elif name not in ignored:
        print(f"[setup] pip setting {key} is not passed on to uv (TERRASCALE_INSTALLER=pip uses it)", file=sys.stderr)
'
}
UV_ARGS=()
uv_prepare() {
  export UV_CACHE_DIR=${UV_CACHE_DIR:-$PWD/.venv/uv-cache}  # beside the venv: hard links, not a second copy
  while IFS= read -r arg; do
    case "$arg" in
      SSL_CERT_FILE=*|UV_HTTP_TIMEOUT=*) export "${arg?}" ;;
      *) UV_ARGS+=("$arg") ;;
    esac
  done < <(uv_settings)
  # pip merges every index it is given and takes the best match; uv's default would stop at the first index
  UV_ARGS+=(--index-strategy unsafe-best-match --compile-bytecode)
  if [ ! -x .venv/bin/uv ]; then
    pip_quiet install --quiet -c constraints.txt uv \
      || { echo "[setup] could not install uv with pip (TERRASCALE_INSTALLER=pip installs without it)"; exit 1; }
  fi
}
pip_install() {
  case "${TERRASCALE_INSTALLER:-uv}" in
    uv)
      [ ${#UV_ARGS[@]} -gt 0 ] || uv_prepare
      .venv/bin/uv pip install --quiet --python .venv/bin/python -c constraints.txt "${UV_ARGS[@]}" "$@" \
        || { echo "[setup] uv pip install failed"; exit 1; } ;;
    pip)
      pip_quiet install --quiet -c constraints.txt "$@" || { echo "[setup] pip install failed"; exit 1; } ;;
    *)
      echo "[setup] TERRASCALE_INSTALLER=${TERRASCALE_INSTALLER}: give uv (the default) or pip"; exit 2 ;;
  esac
}

# DeepSpeed JIT-compiles its CPU ops on first use (30 s to 6 min each) into a folder the venv owns. Training on CPU
# needs none of them: terrascale steps with torch's AdamW (no cpu_adam) and marks DeepSpeed's shared-memory
# all-reduce op unavailable (trainer.runtime.skip_cpu_shm_comm: only DeepSpeed inference uses it). async_io (NVMe
# offload, profile zero3_nvme) is left to its first use (4-6 min on one core), unless TERRASCALE_OPS=background
# (what .ci/run sets): then it is built in the background, on one core, as soon as torch and DeepSpeed are
# installed, and setup does not wait for it; a run that needs it meanwhile waits for torch's build lock.
BACKGROUND_OPS=$([ "${TERRASCALE_OPS:-}" = background ] && echo 1 || true)
building() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
start_op_builds() {
  if [ -n "$BACKGROUND_OPS" ] && [ ! -f .venv/.ds-aio-built ] && ! building .venv/.ds-aio-building; then
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

stamp=.venv/.terrascale-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing (torch/torchvision pinned by constraints.txt; 1-2 min on a fresh machine)"
  # The constraints file stops the resolver (uv or pip) from swapping torch for another build while resolving
  # DeepSpeed/TerraTorch.
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
if [ -n "$BACKGROUND_OPS" ] && building .venv/.ds-aio-building; then
  echo "[setup] DeepSpeed's async_io op goes on compiling in the background; a zero3_nvme run started meanwhile waits for it"
fi
echo "[setup] ready: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(" | ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "accelerate", "terratorch")))')"
