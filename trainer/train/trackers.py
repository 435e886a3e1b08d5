"""Experiment trackers through Accelerate: TensorBoard always available, MLflow and Weights & Biases when installed.

Config key (proposed): `run.trackers: [tensorboard]` (default), any of `tensorboard`, `mlflow`, `wandb`, or `all`
(every one installed). A tracker that is asked for but not installed is skipped with a note, so the same YAML
runs on a laptop without wandb and on a cluster with it. Offline by default: W&B writes to the job dir
(`WANDB_MODE=offline`, sync later with `wandb sync`), MLflow to a file store in the job dir
(`MLFLOW_TRACKING_URI=file:<job>/mlruns`); a value already in the environment wins (a team's server).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from trainer.errors import ConfigError

# tracker name -> the import Accelerate needs for it (its own availability checks import the same names)
KNOWN = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def installed(module: str) -> bool:
    """Without importing it: wandb and mlflow take seconds to import."""
    return importlib.util.find_spec(module) is not None


def select_trackers(requested: Iterable[str], available: Callable[[str], bool] = installed
                    ) -> tuple[list[str], list[str]]:
    """(trackers for `Accelerator(log_with=...)`, notes on skipped ones). Unknown names are a ConfigError."""
    requested = list(requested)
    unknown = [n for n in requested if n not in KNOWN and n != "all"]
    if unknown:
        issues = []
        for n in unknown:
            near = difflib.get_close_matches(n, [*KNOWN, "all"], n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            issues.append(f"run.trackers: unknown tracker {n!r}; {hint}choose from {', '.join([*KNOWN, 'all'])}")
        raise ConfigError(issues)
    wanted = list(KNOWN) if "all" in requested else list(dict.fromkeys(requested))
    chosen = [n for n in wanted if available(KNOWN[n])]
    notes = [f"run.trackers: {n} is not installed (pip install {n}); not logging to it"
             for n in wanted if n not in chosen and "all" not in requested]
    return chosen, notes


def offline_env(trackers: list[str], job_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment defaults that keep the chosen trackers on local disk; only keys not already set."""
    environ = os.environ if environ is None else environ
    job_dir = Path(job_dir).resolve()
    want: dict[str, str] = {}
    if "wandb" in trackers:
        want.update(WANDB_MODE="offline", WANDB_DIR=str(job_dir / "logs"))
    if "mlflow" in trackers:
        want["MLFLOW_TRACKING_URI"] = f"file:{job_dir / 'mlruns'}"
    return {k: v for k, v in want.items() if k not in environ}


def init_kwargs(trackers: list[str], run_name: str, job_dir: Path) -> dict[str, dict[str, Any]]:
    """`accelerator.init_trackers(..., init_kwargs=...)`: one run per job, named after it."""
    out: dict[str, dict[str, Any]] = {}
    if "wandb" in trackers:
        # resume="allow" + a stable id: a resumed job appends to the same W&B run instead of starting a new one
        out["wandb"] = {"name": run_name, "id": _stable_id(job_dir), "resume": "allow"}
    if "mlflow" in trackers:
        out["mlflow"] = {"run_name": run_name}
    return out


def _stable_id(job_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(Path(job_dir).resolve()).encode()).hexdigest()[:16]


def hparams(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """The experiment flattened to scalars (`optim.lr`: 0.001), which is what TensorBoard's hparams accept."""
    out: dict[str, int | float | str | bool] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(hparams(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
