"""Experiment sweeps: many experiments, one after another, each a resumable job in its own directory.

    terrascale sweep launch/configs/a.yaml launch/configs/b.yaml run.max_steps=500
    terrascale sweep matrix.yaml                # base config × axes, see MatrixSpec

Each job is a subprocess of `launch/train.py` (or `accelerate launch launch/train.py` for several processes) with
`checkpoint.dir=<sweep dir>/<job>` and `checkpoint.resume=auto`. Killing the sweep (SIGTERM/SIGINT) passes the
signal to the running job, which saves a checkpoint; running the same command again skips finished jobs (a
`sweep_done.json` marker or an `export/model.safetensors`) and resumes the interrupted one. A job that fails is
recorded (exit code, stderr tail) and the sweep goes on. `summary.md` / `summary.csv` are rewritten after every
job (see trainer.sweep.sweep_summary).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.errors import CheckpointError, ConfigError, TerrascaleError
from trainer.sweep.sweep_summary import JobResult

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"
DONE_FILE = "sweep_done.json"
STATE_FILE = "sweep.json"
STDOUT_LOG, STDERR_LOG = "sweep.stdout.log", "sweep.stderr.log"
# What trainer.train.run logs when a job stopped early on request (signal, run.stop_at_step): exit 0, not finished.
STOPPED_MESSAGE = "Re-run the same command to continue"


class MatrixSpec(BaseModel):
    """The `sweep:` section of a matrix file. Paths are relative to the working directory; `base` may also be
    relative to the matrix file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    axes: dict[str, list[Any]] = Field(default_factory=dict)  # dotted key -> values; the cartesian product
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted key -> value, for every job
    dir: str | None = None
    processes: int | None = Field(None, ge=1)
    accelerate_config: str | None = None


@dataclass(frozen=True)
class JobSpec:
    name: str
    config: str
    overrides: tuple[str, ...]
    axes: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Launcher:
    """processes None: as the Accelerate config says, else 1. No config and 1 process: plain `python`."""

    processes: int | None = None
    accelerate_config: str | None = None


@dataclass(frozen=True)
class Sweep:
    dir: Path
    jobs: tuple[JobSpec, ...]
    launcher: Launcher


def override(key: str, value: Any) -> str:
    """A `key=value` that trainer.config parses back to `value`: plain when YAML reads the text back as the same
    string, else JSON (which is YAML flow syntax: quoted strings, lists, mappings, null)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return f"{key}={value}"
        except yaml.YAMLError:
            pass
    return f"{key}={json.dumps(value)}"


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:40] or "x"


def expand_matrix(spec: MatrixSpec, matrix_path: Path) -> list[JobSpec]:
    base = Path(spec.base)
    if not base.is_absolute() and (matrix_path.parent / base).is_file():
        base = matrix_path.parent / base
    if not base.is_file():
        raise ConfigError([f"sweep.base: {spec.base} does not exist (relative to the working directory or to "
                           f"{matrix_path.parent})"], source=str(matrix_path))
    empty = [k for k, v in spec.axes.items() if not v]
    if empty:
        raise ConfigError([f"sweep.axes.{k}: give at least one value" for k in empty], source=str(matrix_path))
    common = tuple(override(k, v) for k, v in spec.overrides.items())
    keys = list(spec.axes)
    jobs = []
    for values in itertools.product(*(spec.axes[k] for k in keys)):
        name = "-".join(_slug(v) for v in values) or matrix_path.stem
        jobs.append(JobSpec(name, str(base), (*common, *(override(k, v) for k, v in zip(keys, values))),
                            tuple(zip(keys, values))))
    return jobs


def _read(path: Path) -> dict:
    from trainer.config import read_yaml

    return read_yaml(path)


def load_sweep(paths: list[str], overrides: list[str] | None = None, sweep_dir: str | None = None,
               processes: int | None = None, accelerate_config: str | None = None) -> Sweep:
    """Experiment YAMLs (one job each) and matrix files (a `sweep:` section) → the ordered job list."""
    from trainer.config import format_validation_error

    if not paths:
        raise ConfigError(["give at least one experiment YAML or matrix file"], source="command line")
    jobs: list[JobSpec] = []
    spec_dir, launcher = None, Launcher(processes, accelerate_config)
    for p in map(Path, paths):
        raw = _read(p)
        if "sweep" not in raw:
            jobs.append(JobSpec(p.stem, str(p), ()))
            continue
        extra = sorted(set(raw) - {"sweep"})
        if extra:
            raise ConfigError([f"{k}: a matrix file holds only the `sweep:` section; put experiment settings in "
                               "sweep.base or sweep.overrides" for k in extra], source=str(p))
        try:
            spec = MatrixSpec.model_validate(raw["sweep"])
        except ValidationError as e:
            raise ConfigError([f"sweep.{i}" for i in format_validation_error(e, MatrixSpec)], source=str(p)) from None
        jobs += expand_matrix(spec, p)
        spec_dir = spec_dir or spec.dir
        launcher = Launcher(processes or spec.processes, accelerate_config or spec.accelerate_config)
    cli = tuple(overrides or ())
    jobs = [JobSpec(j.name, j.config, (*j.overrides, *cli), j.axes) for j in _unique_names(jobs)]
    root = Path(sweep_dir or spec_dir or Path("runs") / "sweeps" / Path(paths[0]).stem)
    return Sweep(root, tuple(jobs), launcher)


def _unique_names(jobs: list[JobSpec]) -> list[JobSpec]:
    seen: dict[str, int] = {}
    out = []
    for j in jobs:
        n = seen.get(j.name, 0) + 1
        seen[j.name] = n
        out.append(j if n == 1 else JobSpec(f"{j.name}-{n}", j.config, j.overrides, j.axes))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_prefix(launcher: Launcher, port: int | None = None) -> list[str]:
    """The command up to the script: `[python]` for one process without an Accelerate config, else
    `accelerate launch ...` (the venv's, beside this Python)."""
    if launcher.accelerate_config is None and (launcher.processes or 1) == 1:
        return [sys.executable]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate) if accelerate.is_file() else "accelerate", "launch"]
    if launcher.accelerate_config:
        cmd += ["--config_file", launcher.accelerate_config]
    elif (launcher.processes or 1) > 1:
        cmd += ["--multi_gpu"]  # several processes without a config file; on a CPU host trainer.train.run picks gloo
    if launcher.processes:
        cmd += ["--num_processes", str(launcher.processes)]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd


def job_command(job: JobSpec, launcher: Launcher, job_dir: Path, port: int | None = None) -> list[str]:
    return [*launcher_prefix(launcher, port), str(TRAIN_SCRIPT), "--config", job.config, *job.overrides,
            f"checkpoint.dir={job_dir}", "checkpoint.resume=auto"]


# --- the job directory as the sweep sees it --------------------------------------------------------------


def is_finished(job_dir: Path) -> bool:
    return (job_dir / DONE_FILE).is_file() or (job_dir / "export" / "model.safetensors").is_file()


def planned_memory(exp) -> tuple[float | None, float | None, str]:
    """(device peak MiB, CPU RAM MiB, note) the memory planner predicts for the experiment's own profile.

    The one place that reads `trainer.plan.planner`. The budget is unbounded: only the estimate is read, not
    whether it fits. On a host without CUDA the planner predicts a CPU run (fp32, no CUDA context), which is
    what such a host observes. TerraTorch parts the planner has not measured before are measured (11-17 s).
    """
    from trainer.plan.builders import terratorch_builders
    from trainer.plan.planner import plan_experiment
    from trainer.runtime import cuda_available

    name = exp.memory.profile
    if name == "auto":
        return None, None, "profile auto: the planner chooses at run time"
    device = "cuda" if cuda_available() else "cpu"
    try:
        plan = plan_experiment(exp, 1 << 50, 1 << 50, exp.memory.nvme_path, builders=terratorch_builders(),
                               device=device, profiles=(name,))
    except TerrascaleError as e:
        return None, None, f"planner: {e}"
    est = plan.estimates[name]
    if not est.gpu:
        return None, None, f"planner: {est.refused or 'no estimate'}"
    return est.gpu["total"] / 2**20, est.cpu["total"] / 2**20, f"planned for {device}"


def _stderr_tail(path: Path, offset: int, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


class _StopFlag:
    """SIGTERM/SIGINT to the sweep: passed on to the running job (it saves and exits); no new job starts.

    The handler only records; `run_job` forwards from its polling loop, so no signal is lost between starting a
    job and knowing its pid. Each signal is forwarded once: a second Ctrl-C aborts the job as it would alone.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        self.received.append(signum)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the sweep itself is killed (SIGKILL leaves no handler)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total / 2**20


def run_job(job: JobSpec, launcher: Launcher, job_dir: Path, result: JobResult, stop: _StopFlag) -> JobResult:
    job_dir.mkdir(parents=True, exist_ok=True)
    multi = launcher.accelerate_config is not None or (launcher.processes or 1) > 1
    cmd = job_command(job, launcher, job_dir, free_port() if multi else None)
    err_path = job_dir / STDERR_LOG
    t0, peak = time.monotonic(), result.tree_peak_rss_mb or 0.0
    with open(job_dir / STDOUT_LOG, "a") as out, open(err_path, "a") as err:
        err.write(f"\n=== sweep attempt {result.attempts + 1}: {' '.join(cmd)}\n")
        err.flush()
        offset = err.tell()  # this attempt's own output starts here
        # Its own process group (session): the sweep's signals reach the job only as forwarded below.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True, preexec_fn=_die_with_parent)
        forwarded = 0  # a signal that came after the sweep's last check still reaches this job
        while proc.poll() is None:
            for sig in stop.received[forwarded:]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # the launcher and every rank
            forwarded = len(stop.received)
            peak = max(peak, _tree_rss_mb(proc.pid))
            time.sleep(0.5)
    code = proc.returncode
    tail = _stderr_tail(err_path, offset)
    result.command, result.exit_code, result.attempts = cmd, code, result.attempts + 1
    result.seconds += time.monotonic() - t0
    result.tree_peak_rss_mb = peak or None
    if code == 0 and stop.signal is None and STOPPED_MESSAGE not in tail:
        result.status, result.error = "done", ""
        (job_dir / DONE_FILE).write_text(json.dumps(asdict(result), indent=2))
    elif code == 0 or stop.signal is not None:
        result.status, result.error = "interrupted", ""
    else:
        result.status, result.error = "failed", tail
    return result


@contextlib.contextmanager
def _locked(sweep_dir: Path):
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise CheckpointError(f"another sweep is running in {sweep_dir}; wait for it or stop it first") from e
        yield


def read_state(sweep_dir: Path) -> dict[str, JobResult]:
    path = sweep_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())["jobs"]
        return {name: JobResult(**r) for name, r in raw.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s): starting the record afresh; job dirs are untouched", path, e)
        return {}


def _save_state(sweep_dir: Path, results: dict[str, JobResult]) -> None:
    tmp = sweep_dir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"jobs": {n: asdict(r) for n, r in results.items()}}, indent=2))
    os.replace(tmp, sweep_dir / STATE_FILE)


def run_sweep(sweep: Sweep, echo=print) -> int:
    """Run every unfinished job in order. 0: all done (or stopped on request); 1: some job failed."""
    from trainer.config import load_experiment
    from trainer.sweep.sweep_summary import write_summary

    with _locked(sweep.dir), _StopFlag() as stop:
        results = read_state(sweep.dir)
        for i, job in enumerate(sweep.jobs, 1):
            job_dir = sweep.dir / job.name
            res = results.get(job.name) or JobResult(job.name)
            results[job.name] = res
            if stop.signal is not None:
                break
            if is_finished(job_dir):
                res.status = "done"
                echo(f"[sweep] {i}/{len(sweep.jobs)} {job.name}: finished earlier, skipped")
                continue
            try:  # a wrong config fails here in a second, not after a subprocess has imported TerraTorch
                exp = load_experiment(job.config, list(job.overrides))
            except TerrascaleError as e:
                res.status, res.exit_code, res.error, res.attempts = "failed", e.exit_code, str(e), res.attempts + 1
                echo(f"[sweep] {i}/{len(sweep.jobs)} {job.name}: invalid config, not run\n{e}")
                continue
            if res.planned_peak_mb is None and not res.note:
                res.planned_peak_mb, res.planned_cpu_mb, res.note = planned_memory(exp)
            resumed = " (resuming)" if (job_dir / "checkpoints").is_dir() else ""
            echo(f"[sweep] {i}/{len(sweep.jobs)} {job.name}: running{resumed}, logs in {job_dir}")
            run_job(job, sweep.launcher, job_dir, res, stop)
            echo(f"[sweep] {job.name}: {res.status} (exit {res.exit_code}, {res.seconds:.0f} s)"
                 + (f"\n{res.error}" if res.status == "failed" else ""))
            _save_state(sweep.dir, results)
            write_summary(sweep, results)
        _save_state(sweep.dir, results)
        md, _ = write_summary(sweep, results)
    if stop.signal is not None:
        echo(f"[sweep] stopped by {signal.Signals(stop.signal).name}; run the same command to continue. "
             f"Summary: {md}")
        return 0
    failed = [n for n, r in results.items() if r.status == "failed" and n in {j.name for j in sweep.jobs}]
    echo(f"[sweep] summary: {md}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
