"""The job directory: checkpoints (atomic, resumable, pruned), metrics, the frozen config, exports, signals.

Layout of a job dir:
    config.yaml                 the resolved experiment, frozen at the first start
    metrics.jsonl               one JSON object per logged event (train / val), rank 0 only
    curves.png                  loss and validation metric curves
    checkpoints/step-000200/    Accelerate `save_state` (+ DeepSpeed shards), progress.json, scheduler.json,
                                rng_state_<rank>.safetensors, COMPLETE (nothing that resume unpickles)
    job.lock                    held by the running job's rank 0 (trainer.train.joblock)
    export/model.safetensors    consolidated weights at the end (gathered from ZeRO-3)
    logs/                       TensorBoard event files

A checkpoint is written under `step-XXXXXX.tmp`, marked COMPLETE, then renamed; only marked, renamed
directories are ever resumed, so a save killed half-way is ignored (and cleaned up by the next save).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.train import ckpt_state

from trainer import diskspace
from trainer.diskspace import DiskFullError
from trainer.errors import CheckpointError

log = logging.getLogger(__name__)

CKPT_SUBDIR = "checkpoints"
MARKER = "COMPLETE"
PROGRESS_FILE = "progress.json"
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class Progress:
    """Where training stands; saved inside each checkpoint.

    `batch_in_epoch` counts micro-batches this rank consumed in the current epoch (a multiple of
    `grad_accum` at every checkpoint), so resuming skips exactly the data already seen.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    world_size: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> "Progress":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read training progress ({e}); the checkpoint is damaged") from e


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(job_dir: Path) -> Path:
    return Path(job_dir) / CKPT_SUBDIR


def is_complete(path: Path) -> bool:
    return bool(_NAME.match(path.name)) and (path / MARKER).is_file() and (path / PROGRESS_FILE).is_file()


def list_complete(job_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Unmarked or temporary directories are skipped."""
    root = checkpoints_dir(job_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            if is_complete(p):
                found.append((int(m.group(1)), p))
            else:
                log.warning("skipping incomplete checkpoint %s (no %s marker)", p, MARKER)
    return [p for _, p in sorted(found)]


def find_resume(job_dir: Path, resume: bool | str) -> Path | None:
    """`resume: false` → None (refuses a job dir that already holds checkpoints: nothing is overwritten);
    `auto` → newest complete checkpoint or None; a path → that checkpoint, which must be complete."""
    if resume is False:
        existing = list_complete(job_dir)
        if existing:
            raise CheckpointError(
                f"{job_dir} already holds {len(existing)} checkpoint(s) (newest {existing[-1].name}) and "
                "checkpoint.resume is false: set checkpoint.resume=auto to continue, or choose a new checkpoint.dir")
        return None
    if resume == "auto":
        done = list_complete(job_dir)
        return done[-1] if done else None
    path = Path(str(resume))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {path} does not exist; give a step-XXXXXX directory or 'auto'")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker or "
                              f"{PROGRESS_FILE}); it was probably interrupted while saving: use an older one")
    return path


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rank0_numbers(accelerator, values: list[float]) -> list[float]:
    """Rank 0's numbers on every rank (others pass zeros). A collective: one tiny all-reduce."""
    if accelerator.num_processes == 1:
        return values
    import torch

    t = torch.tensor(values if accelerator.is_main_process else [0.0] * len(values), dtype=torch.float64,
                     device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


@contextmanager
def _disk_full_is_clear(tmp: Path, need: float):
    """A full disk during the save: the partial `.tmp` is removed and one message says what is needed."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not diskspace.is_disk_full(e):
            raise
        diskspace.remove_partial(tmp)
        raise DiskFullError(diskspace.message(tmp.parent, int(need), diskspace.free_bytes(tmp.parent))) from e


def save_checkpoint(accelerator, job_dir: Path, progress: Progress, keep_last: int, scheduler=None,
                    frozen_excluded: bool = False) -> Path:
    """Collective: every rank must call it. Returns the final directory. `scheduler`: our own LR scheduler
    (saved as JSON), None when DeepSpeed's engine owns it. Refuses to start (DiskFullError) when the disk lacks
    the room a checkpoint takes; the newest complete checkpoint is never touched before the new one is complete."""
    root = checkpoints_dir(job_dir)
    final = root / checkpoint_name(progress.step)
    tmp = root / f"{final.name}.tmp"
    need = free = 0.0
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed: never trusted, so safe to drop
            shutil.rmtree(tmp)
        done = list_complete(job_dir)
        need = diskspace.estimate(done[-1] if done else None, accelerator.unwrap_model(accelerator._models[0]),
                                  frozen_excluded)
        free = diskspace.free_bytes(root)
    need, free = _rank0_numbers(accelerator, [float(need), float(free)])
    if free < need:
        raise DiskFullError(diskspace.message(root, int(need), int(free)))
    accelerator.wait_for_everyone()
    with _disk_full_is_clear(tmp, need):
        accelerator.save_state(str(tmp))
        ckpt_state.save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _disk_full_is_clear(tmp, need):
            if scheduler is not None:
                ckpt_state.save_scheduler(tmp, scheduler)
            _fsync_write(tmp / PROGRESS_FILE, progress.to_json())
            _fsync_write(tmp / MARKER, f"{final.name}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(job_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _frozen_prefixes(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _is_frozen(key: str, frozen: set[str]) -> bool:
    """A frozen parameter, or bitsandbytes quantization state hanging off one (`...weight.absmax`)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in frozen for i in range(len(parts), 0, -1))


def drop_frozen_weights(models, weights, output_dir) -> None:
    """`save_state` pre-hook for LoRA/QLoRA without DeepSpeed: frozen backbone weights never change (they are
    rebuilt from the config and pretrained checkpoint at every start), so checkpoints keep only what trains.
    For a 26B backbone that is megabytes instead of tens of gigabytes per checkpoint."""
    for model, state in zip(models, weights):
        frozen = _frozen_prefixes(model)
        for key in [k for k in state if _is_frozen(k, frozen)]:
            del state[key]


def has_frozen_parameters(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _check_partial(accelerator, path: Path) -> None:
    """Before a non-strict load: the file must hold every trainable tensor and nothing unknown."""
    from safetensors import safe_open

    model = accelerator.unwrap_model(accelerator._models[0])
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        saved = set(f.keys())
    expected = set(model.state_dict())
    frozen = _frozen_prefixes(model)
    missing = sorted(k for k in expected - saved if not _is_frozen(k, frozen))
    unexpected = sorted(saved - expected)
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match this model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}; was it written with another memory profile or backbone?")


def load_checkpoint(accelerator, path: Path, frozen_excluded: bool = False, scheduler=None) -> Progress:
    """Collective. Restores model, optimizer, scheduler, RNG of every rank; returns the saved progress.
    `frozen_excluded`: the checkpoint was written with `drop_frozen_weights` (checked key by key).
    Nothing in the checkpoint is unpickled with code execution (trainer.train.ckpt_state)."""
    import pickle

    progress = Progress.from_file(path / PROGRESS_FILE)
    if progress.world_size != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {progress.world_size} process(es) but this run has {accelerator.num_processes}: "
            "resume with the same number of processes, or convert it with `terrascale universal` (DeepSpeed "
            "universal checkpoint) first")
    ckpt_state.refuse_custom_pickles(path)
    kwargs = {}
    if frozen_excluded:
        _check_partial(accelerator, path)
        kwargs["strict"] = False
    try:
        with ckpt_state.safe_loading():
            accelerator.load_state(str(path), **kwargs)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        if ckpt_state.is_refused_pickle(e):
            raise CheckpointError(ckpt_state.refused_message(path, e)) from e
        raise CheckpointError(f"{path}: cannot load checkpoint ({e})") from e
    ckpt_state.load_rng(path, accelerator.process_index)
    if scheduler is not None:
        ckpt_state.load_scheduler(path, scheduler)
    return progress


def prune(job_dir: Path, keep_last: int) -> list[Path]:
    done = list_complete(job_dir)
    removed = done[:-keep_last] if keep_last > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


class StopRequest:
    """SIGTERM/SIGINT ask for a stop at the next step boundary (after a checkpoint); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: will save a checkpoint and stop at the next step boundary",
                    signal.Signals(signum).name)

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was signalled. A collective: costs one tiny all-reduce per step."""
        import torch

        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)
