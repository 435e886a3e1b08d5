"""Per-band normalization statistics (mean, std) over the training tiles.

Stats cover every band of the tile, in file order, so one stats.json serves any `data.bands` selection.
They are computed one tile at a time (Chan's parallel update in float64: memory is one tile, and the
result does not depend on how large the sums grow), skipping NaN and nodata values.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from trainer.data.geotiff import band_count_error, find_samples, invalid_values, read_tile
from trainer.errors import DataError


@dataclass(frozen=True)
class BandStats:
    mean: list[float]
    std: list[float]
    count: list[int]  # valid pixels per band
    num_files: int


def compute_stats(files: Sequence[str | Path], nodata: float | None = None) -> BandStats:
    """Mean and (population) std of each band over all valid pixels of `files`."""
    n = mean = m2 = None
    first = ""
    for path in map(str, files):
        arr, file_nodata = read_tile(path)
        c = arr.shape[0]
        if n is None:
            n, mean, m2, first = np.zeros(c), np.zeros(c), np.zeros(c), path
        elif c != len(n):
            raise band_count_error(first, len(n), path, c)
        valid = ~invalid_values(arr, file_nodata, nodata).reshape(c, -1)
        x = arr.reshape(c, -1).astype("float64")
        nb = valid.sum(axis=1).astype("float64")
        mb = np.where(valid, x, 0.0).sum(axis=1) / np.maximum(nb, 1)
        m2b = (np.where(valid, x - mb[:, None], 0.0) ** 2).sum(axis=1)
        total = n + nb
        delta = mb - mean
        mean = mean + delta * nb / np.maximum(total, 1)
        m2 = m2 + m2b + delta**2 * n * nb / np.maximum(total, 1)
        n = total
    if n is None:
        raise DataError("no training tiles to compute normalization stats from: check data.train_images")
    if (n == 0).any():
        empty = [int(i) + 1 for i in np.flatnonzero(n == 0)]
        raise DataError(f"bands {empty} have no valid pixels in the {len(files)} training tiles (first {first}): "
                        "every value is NaN or nodata; check data.nodata and the files' nodata tags")
    std = np.sqrt(m2 / n)
    return BandStats(mean.tolist(), std.tolist(), n.astype("int64").tolist(), len(files))


def write_stats(path: str | Path, stats: BandStats) -> None:
    """Write JSON atomically: readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(asdict(stats), indent=2))
    os.replace(tmp, path)


def read_stats(path: str | Path) -> BandStats:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        mean, std = [float(v) for v in raw["mean"]], [float(v) for v in raw["std"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read normalization stats {path}: {e!r}; it needs lists \"mean\" and \"std\" "
                        "(delete it to have it recomputed from the training tiles)") from e
    if len(mean) != len(std) or not mean:
        raise DataError(f"normalization stats {path} has {len(mean)} means but {len(std)} stds: "
                        "delete it to have it recomputed")
    return BandStats(mean, std, [int(c) for c in raw.get("count", [])], int(raw.get("num_files", 0)))


def load_or_compute_stats(files: Sequence[str | Path], path: str | Path, *, nodata: float | None = None,
                          is_main: bool = True, barrier: Callable[[], None] | None = None) -> BandStats:
    """Read `path`, computing it from `files` first when absent.

    With a `barrier` (distributed run) only the main process computes and every rank calls the barrier
    exactly once; without one each process may compute, which is safe because the result is identical
    and the write is atomic.
    """
    path = Path(path)
    if (is_main or barrier is None) and not path.exists():
        write_stats(path, compute_stats(files, nodata))
    if barrier is not None:
        barrier()
    return read_stats(path)


def write_stats_for(exp, force: bool = False) -> Path:
    """`terrascale stats`: compute (or, with `force`, recompute) the experiment's per-band stats file."""
    data = exp.data
    if data.kind == "terratorch":
        raise DataError("data.kind is terratorch: its datamodule carries its own means/stds (init_args.means/stds)")
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist: point it at the folder holding train/ and val/")
    path = Path(data.stats) if data.stats else root / "stats.json"
    train = find_samples(root, data.train_images, data.train_labels, exp.task.dates)
    files = [p for s in train for p in s.images]
    if force or not path.is_file():
        write_stats(path, compute_stats(files, nodata=data.nodata))
    return path
