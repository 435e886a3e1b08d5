"""Free space for checkpoints: check before a save, and turn a full disk during one into one clear message.

The estimate is the size of the newest complete checkpoint when there is one (exact: same model, same
optimizer), else what the model and its optimizer hold (weights, plus fp32 master copy and two Adam moments for
what trains). A save needs that much free on the job dir's filesystem, because the previous checkpoint is only
pruned after the new one is complete.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from trainer.errors import CheckpointError

MB = 1024 * 1024
# Metadata, the RNG/scheduler/progress files and filesystem rounding on top of the tensors themselves.
MARGIN = 1.05
_WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left on device")


class DiskFullError(CheckpointError):
    """Not enough space for a checkpoint. The last complete checkpoint is intact: free space and re-run."""

    exit_code = 3


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def model_state_bytes(model, frozen_excluded: bool) -> int:
    """What a checkpoint of `model` and its optimizer holds, summed over ranks (ZeRO-3 parameters count whole).
    Measured on the tiny demo model: 51.2 MB estimated (with MARGIN) for 51.3 MB written, with and without ZeRO-3."""
    total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", None) or p.numel()
        if p.requires_grad:
            # weights + two fp32 Adam moments, + an fp32 master copy when the weights are 16-bit (DeepSpeed)
            total += numel * (p.element_size() + 8 + (4 if p.element_size() < 4 else 0))
        elif not frozen_excluded:
            total += numel * p.element_size()
    return total


def estimate(previous: Path | None, model, frozen_excluded: bool) -> int:
    raw = directory_bytes(previous) if previous is not None else model_state_bytes(model, frozen_excluded)
    return int(raw * MARGIN)


def free_bytes(directory: Path) -> int:
    path = Path(directory)
    while not path.exists():  # the checkpoints/ folder of a new job
        path = path.parent
    return shutil.disk_usage(path).free


def message(directory: Path, need: int, free: int) -> str:
    return (f"no space left on {directory}: a checkpoint needs ~{need / MB:.0f} MB, {free / MB:.0f} MB free. The "
            "newest complete checkpoint is intact: free space (or lower checkpoint.keep_last, or set checkpoint.dir "
            "on a larger disk) and re-run the same command to continue")


def write_failed(err: OSError, directory: Path | None = None) -> DiskFullError:
    """A full disk outside a checkpoint save (the job's config, metrics, export, a prediction): one clear error
    naming the file when the OS names it (a failed open), else the directory being written into."""
    where = f" writing {err.filename}" if err.filename else f" writing into {directory}" if directory else ""
    return DiskFullError(f"no space left on device{where}. A checkpoint counts only once it is complete, so the newest "
                         "complete one is intact: free space (or set checkpoint.dir on a larger disk) and re-run the "
                         "same command")


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the chain, or torch's zip writer failing on a short write (it reports 'unexpected pos'
    without the errno, e.g. under DeepSpeed's save)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, RuntimeError) and any(s in str(seen) for s in _WRITE_FAILURES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def remove_partial(tmp: Path) -> None:
    """The interrupted save's `.tmp` directory: never trusted, removed so that it frees its space now."""
    shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists():  # a file still open by another rank: drop what can be dropped
        for f in tmp.rglob("*"):
            if f.is_file():
                try:
                    os.unlink(f)
                except OSError:
                    pass
