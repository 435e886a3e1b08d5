"""The Docker image, checked without a Docker engine: hadolint on the Dockerfile, shellcheck on the entrypoint,
every COPY source exists and is inside the build context, and the properties the image promises (CUDA runtime
base, non-root, offline, volumes, prebuilt DeepSpeed ops, pinned torch) are in the file.
The entrypoint itself is run in tests/integration/test_docker_entrypoint.py."""
from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return str(path)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_hadolint_passes():
    r = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "launch/configs/slurm/train.sbatch"])
def test_shellcheck_passes(script):
    r = subprocess.run([_tool("shellcheck"), str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel.rstrip("/")).parts
    for pat in patterns:
        pat = pat.removeprefix("**/").rstrip("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or fnmatch.fnmatch(parts[i], pat)
               for i in range(len(parts))):
            return True
    return False


def test_every_copied_path_exists_in_the_build_context():
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    assert ".venv" in ignore and ".git" in ignore  # a 7 GB venv must never be sent as build context
    copies = [shlex.split(args) for ins, args in _instructions() if ins == "COPY"]
    sources = [src for words in copies if not any(w.startswith("--from") for w in words)
               for src in [w for w in words if not w.startswith("--")][:-1]]
    assert len(sources) >= 6, sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repo"
        assert not _ignored(src, ignore), f"COPY {src}: excluded by .dockerignore"


def test_the_image_promises():
    builder, runtime = _stages()
    assert re.match(r"nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-devel-", builder[0][1])
    assert re.match(r"nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-runtime-", runtime[0][1])
    text = DOCKERFILE.read_text()
    cuda = re.search(r"ARG CUDA_VERSION=(\d+)\.", text).group(1)
    import torch

    assert torch.version.cuda is None or torch.version.cuda.split(".")[0] == cuda, "base CUDA != torch's CUDA"
    user = [args for ins, args in runtime if ins == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    env = " ".join(args for ins, args in runtime if ins == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HF_HOME=/cache/", "TORCH_EXTENSIONS_DIR=/cache/"):
        assert setting in env, setting
    volumes = " ".join(args for ins, args in runtime if ins == "VOLUME")
    assert all(v in volumes for v in ('"/data"', '"/runs"', '"/cache"'))
    assert "DS_BUILD_AIO=1" in text and "DS_BUILD_CPU_ADAM=1" in text and "libaio1" in text
    for ins, args in _instructions():
        if ins == "RUN" and "pip install" in args:
            assert "-c constraints.txt" in args, f"unpinned install (pip would swap torch): {args}"
    entry = [args for ins, args in runtime if ins == "ENTRYPOINT"][-1]
    assert "/app/docker/entrypoint.sh" in entry and "tini" in entry
    default = re.search(r"TERRASCALE_ACCELERATE_CONFIG=/app/(\S+)", text).group(1)
    assert (ROOT / default).is_file()
    cmd = [a for ins, a in runtime if ins == "CMD"][-1]
    assert (ROOT / re.search(r'"--config", "([^"]+)"', cmd).group(1)).is_file()
