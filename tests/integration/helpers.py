"""Run the real entry points (`python launch/train.py`, `accelerate launch`) in subprocesses."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.integration import warm as _warm

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A tiny version of the demo: 32x32 tiles, few of them, a handful of steps.
TINY = [
    "model.backbone_kwargs.img_size=32", "data.synthetic.n_train=32", "data.synthetic.n_val=8",
    "data.synthetic.tile_size=32", "data.batch_size=4", "run.max_steps=6", "run.eval_every=3",
    "run.checkpoint_every=2", "run.log_every=1", "run.progress=false", "scheduler.warmup_steps=2",
    "checkpoint.keep_last=5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(overrides: list[str], nproc: int = 1, config: str | Path = ROOT / "launch/configs/demo.yaml",
              script: str = "launch/train.py") -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ROOT / script), "--config", str(config), *overrides]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(ROOT / script), "--config", str(config), *overrides]


# os.environ as the session started (this module is imported while tests are collected, before any test imports a
# library in-process). Libraries that tests import in-process write into os.environ (OpenCV, albumentations,
# lightly, torch; Lightning's seed_everything): a launch from a shell would not see those, and each new one would
# give the launches another environment, hence another warm zygote (15-20 s of imports each).
_SESSION_ENV = dict(os.environ)
IMPORT_SIDE_EFFECTS = ("GDAL_CURL_CA_BUNDLE", "PROJ_CURL_CA_BUNDLE",  # rasterio
                       "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "LD_LIBRARY_PATH", "LIGHTLY_DID_VERSION_CHECK",
                       "NO_ALBUMENTATIONS_UPDATE", "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCH_CUDNN_V8_API_DISABLED",
                       "PL_GLOBAL_SEED", "PL_SEED_WORKERS",
                       "TORCHINDUCTOR_CACHE_DIR")  # torch._inductor, set to its default /tmp/torchinductor_<user>


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in IMPORT_SIDE_EFFECTS or k in _SESSION_ENV}
    e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: avoid oversubscription
    return e


def run_train(overrides: list[str], nproc: int = 1, timeout: int = 600, warm: bool = True,
              **kw) -> subprocess.CompletedProcess:
    """`train_cmd(...)` run to completion. Each process runs as a warm child (`tests/integration/warm.py`: forked
    from a process that has already imported torch/DeepSpeed/TerraTorch, saving ~15-40 s per launch); several
    processes get the environment `accelerate launch` gives its workers (`warm.run_ranks`). `warm=False` or
    TERRASCALE_TEST_WARM=0 runs the real `python launch/train.py` / `accelerate launch` (tests of the launcher
    itself - signals, exit codes, nodes - use `train_cmd` directly)."""
    cmd, e = train_cmd(overrides, nproc, **kw), env()
    if warm and nproc == 1 and (r := _warm.run(cmd, ROOT, e, timeout)) is not None:
        return r
    if warm and nproc > 1:
        script = train_cmd(overrides, 1, **kw)  # the workers' own command line: python <script> <args>
        if (r := _warm.run_ranks(script, ROOT, e, nproc, free_port(), timeout)) is not None:
            return r
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def run_python(args: list[str], cwd: str | Path = ROOT, timeout: float = 600, env_: dict | None = None,
               ) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True)` (a script or `-m module`), as a
    warm child when a zygote for this environment can serve it (see run_train)."""
    cmd, e = [sys.executable, *map(str, args)], env() if env_ is None else env_
    if (r := _warm.run(cmd, cwd, e, timeout)) is not None:
        return r
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def wait_for_background_ops(limit: float = 1800) -> None:
    """Wait for the async_io build `.ci/run` starts in the background (launch/setup.sh, TERRASCALE_OPS), so
    that a test needing the op does not spend its own timeout on the compile."""
    import time

    pid_file = ROOT / ".venv" / ".ds-aio-building"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and not (
            ROOT / ".venv" / ".ds-aio-built").exists():
        time.sleep(2)


def check(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nSTDOUT:\n{r.stdout[-4000:]}\nSTDERR:\n{r.stderr[-8000:]}"
    return r


def start_until_training(cmd: list[str], job: Path, cwd: str | Path, env_: dict[str, str], steps: int = 2,
                         timeout: float = 400) -> subprocess.Popen:
    """Start a real process (a launcher under test: its output piped) and return once `job` has logged `steps`
    training records; the process must still be running then (its stderr and stdout are shown if not, or if
    `timeout` passes first: the process is then killed)."""
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and not ((job / "metrics.jsonl").is_file() and len(metrics(job)) >= steps):
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"exit {proc.returncode} before {steps} steps (timeout {timeout} s)\n"
                             f"STDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-4000:]}")
    return proc


def metrics(job: Path, split: str = "train") -> list[dict]:
    lines = (job / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def load_export(job: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(job / "export" / "model.safetensors"))


@contextlib.contextmanager
def small_filesystem(where: Path, size: str):
    """A real filesystem of `size` (tmpfs) mounted at `where`, so that ENOSPC comes from the kernel. Needs root
    (CI runs as root); elsewhere the test is skipped, saying why."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
