"""GeoTIFF tile datasets for segmentation, regression and change detection (rasterio).

Layout under `data.root` (globs are `data.train_images` etc.; images and labels pair by file stem):

    segmentation, regression          change detection (T >= 2 co-registered dates)
    train/images/<tile>.tif  C bands  train/images/<tile>_t0.tif ... <tile>_t<T-1>.tif
    train/labels/<tile>.tif  1 band   train/labels/<tile>.tif   1 band, 0 = no change, 1 = change
    val/...                           val/...

Labels: class ids (segmentation, change) or coherence in [0, 1] (regression). A pixel is invalid where
any band of its image equals `data.nodata` or the file's own nodata tag, or is NaN; `data.nodata` applies
to images only, because 0 is both a common image nodata and a real class id. Labels use their file's
nodata tag or NaN.

Augmentation (h/v flips) is a pure function of (seed, epoch, index), so a resumed run replays the same
samples as a straight one whatever the worker count or order.
"""
from __future__ import annotations

import glob
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import rasterio.errors
import torch
from torch.utils.data import Dataset

from trainer.config import TaskConfig
from trainer.errors import DataError

# `<tile>_t<k>` names one date of a change-detection tile; the label is `<tile>`.
DATE_SUFFIX = re.compile(r"^(?P<tile>.+)_t(?P<date>\d+)$")


@dataclass(frozen=True)
class Sample:
    """One training example: its tile name, image file(s) (one per date), and label file."""

    name: str
    images: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class TileHeader:
    path: str
    count: int
    height: int
    width: int
    crs: str | None
    transform: tuple[float, ...]


def band_count_error(path_a: str, count_a: int, path_b: str, count_b: int) -> DataError:
    """Tiles with differing band counts: one message for every place that finds it."""
    return DataError(
        f"tiles have differing band counts: {path_a} has {count_a} bands but {path_b} has {count_b}; "
        "every tile of a dataset must hold the same bands in the same order (re-export or remove the odd tile)"
    )


def read_header(path: str) -> TileHeader:
    try:
        with rasterio.open(path) as src:
            return TileHeader(path, src.count, src.height, src.width,
                              src.crs.to_string() if src.crs else None, tuple(src.transform)[:6])
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot read tile {path}: {e}; replace or delete this file (is it a complete GeoTIFF?)") from e


def read_tile(path: str, bands: Sequence[int] | None = None) -> tuple[np.ndarray, float | None]:
    """Read `bands` (1-based, None = all) as float32 [C, H, W] plus the file's nodata tag."""
    try:
        with rasterio.open(path) as src:
            data = src.read(indexes=list(bands) if bands else None, out_dtype="float32")
            return data, src.nodata
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot read tile {path}: {e}; replace or delete this file (is it a complete GeoTIFF?)") from e


def invalid_values(arr: np.ndarray, file_nodata: float | None, nodata: float | None = None) -> np.ndarray:
    """Boolean mask of NaN values and values equal to either nodata tag."""
    bad = np.isnan(arr)
    for value in (file_nodata, nodata):
        if value is not None and not math.isnan(value):
            bad |= arr == np.float32(value)
    return bad


def wrong_values(label: np.ndarray, invalid: np.ndarray, task: TaskConfig) -> np.ndarray:
    """Label pixels (not `invalid`) the task cannot train on. Regression: outside [0, 1], which the model's
    sigmoid-bounded output (e.g. coherence stored as 0-255) could never reach, so training would fail silently.
    Classes: not an integer in [0, num_classes) and not task.ignore_index."""
    if task.kind.continuous:
        return ~invalid & ((label < 0) | (label > 1))
    check = ~invalid & (label != task.ignore_index)
    return check & ((label < 0) | (label >= task.num_classes) | (label != np.round(label)))


def label_range_error(path: str, values: Sequence[float], task: TaskConfig) -> DataError:
    """Label values a task cannot train on: one message wherever they are found (before step 1 or at read)."""
    if task.kind.continuous:
        return DataError(f"regression label tile {path} has values {list(values)[:5]} outside [0, 1]: coherence "
                         "targets must be in [0, 1] (rescale the product, or tag invalid values as the file's nodata)")
    k, ignore = task.num_classes, task.ignore_index
    shown = [int(v) if float(v).is_integer() else float(v) for v in list(values)[:10]]
    return DataError(f"label tile {path} has values {shown} outside [0, {k}) (task.num_classes={k}, "
                     f"task.ignore_index={ignore}): remap them, raise task.num_classes, or tag them as the file's "
                     "nodata")


# ---------------------------------------------------------------------------------------------------
# Finding and pairing files


def glob_files(root: Path, pattern: str) -> list[str]:
    # glob.glob rather than Path.glob: it also accepts absolute patterns and `**`.
    files = sorted(p for p in glob.glob(os.path.join(str(root), pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"no files match {pattern!r} under {root}: check data.root and the data.*_images/"
                        "*_labels globs (they are relative to data.root)")
    return files


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _group_dates(images: list[str], pattern: str, num_dates: int) -> dict[str, tuple[str, ...]]:
    """`<tile>_t<k>` files → {tile: (t0, t1, ...)}; every tile must have the dates 0..T-1, T = task.num_dates."""
    dates: dict[str, dict[int, str]] = defaultdict(dict)
    for path in images:
        m = DATE_SUFFIX.match(_stem(path))
        if m is None:
            raise DataError(f"change-detection image {path} (matched by {pattern!r}) is not named <tile>_t<k>.tif: "
                            "name each date <tile>_t0.tif, <tile>_t1.tif, ... next to each other")
        dates[m["tile"]][int(m["date"])] = path
    n_dates = max(len(d) for d in dates.values())
    if n_dates < 2:
        raise DataError(f"change detection needs at least two dates per tile but {pattern!r} found only _t0 "
                        "files: add the <tile>_t1.tif images")
    if n_dates != num_dates:
        tile = next(t for t, d in dates.items() if len(d) == n_dates)
        raise DataError(f"tiles have {n_dates} dates (e.g. {sorted(dates[tile].values())}) but the model is built "
                        f"for task.num_dates={num_dates}: set task.num_dates={n_dates}, or keep only the dates "
                        f"_t0.._t{num_dates - 1} under {pattern!r}")
    for tile, by_date in dates.items():
        if sorted(by_date) != list(range(n_dates)):
            raise DataError(f"tile {tile!r} has dates {sorted(by_date)} but tiles must have dates 0..{n_dates - 1} "
                            f"(files {sorted(by_date.values())}): add the missing <tile>_t<k>.tif or remove the tile")
    return {tile: tuple(by_date[t] for t in range(n_dates)) for tile, by_date in dates.items()}


def find_samples(root: Path, images_glob: str, labels_glob: str, num_dates: int = 1) -> list[Sample]:
    """Pair images and labels by sorted order and file stem; any file without its partner is an error. With
    `num_dates` > 1 (change detection) each image is one date, `<tile>_t<k>`, and every tile has them all."""
    images = glob_files(root, images_glob)
    labels = glob_files(root, labels_glob)
    if num_dates > 1:
        groups = _group_dates(images, images_glob, num_dates)
    else:
        groups = {}
        for path in images:
            if _stem(path) in groups:
                raise DataError(f"two images share the stem {_stem(path)!r}: {groups[_stem(path)][0]} and {path}; "
                                "stems must be unique to pair with labels")
            groups[_stem(path)] = (path,)
    by_stem = {_stem(p): p for p in labels}
    missing = sorted(set(groups) - set(by_stem))
    extra = sorted(set(by_stem) - set(groups))
    if missing or extra or len(by_stem) != len(labels):
        detail = []
        if missing:
            detail.append(f"images without a label: {[groups[s][0] for s in missing[:5]]}")
        if extra:
            detail.append(f"labels without an image: {[by_stem[s] for s in extra[:5]]}")
        if len(by_stem) != len(labels):
            detail.append("two labels share a stem")
        raise DataError(f"images {images_glob!r} and labels {labels_glob!r} under {root} do not pair up by file "
                        f"stem ({'; '.join(detail)}): give every image tile a label with the same name")
    return [Sample(name, groups[name], by_stem[name]) for name in sorted(groups)]


# ---------------------------------------------------------------------------------------------------
# Dataset


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The only source of randomness for a sample: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([abs(int(seed)), int(epoch), int(index)])


def same_grid(a: TileHeader, b: TileHeader) -> bool:
    # Transforms are compared to a millionth of a pixel: float round-trips through GDAL are not bit-exact.
    tol = 1e-6 * max(abs(a.transform[0]), abs(a.transform[4]), 1e-12)
    return (a.crs == b.crs and (a.height, a.width) == (b.height, b.width)
            and all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a.transform, b.transform)))


class GeoTiffDataset(Dataset):
    """GeoTIFF tiles → {"image": float32 [C,H,W] ([T,C,H,W] for change detection), "mask": int64 or float32 [H,W]}.

    `mean`/`std` hold one value per band of the tile, or one per selected band. Tile headers are checked
    here (band counts, band indices, co-registration of dates, label shapes) so mistakes surface before
    training starts; label values are checked as tiles are read.
    """

    def __init__(self, samples: Sequence[Sample], *, task: TaskConfig, mean: Sequence[float], std: Sequence[float],
                 bands: Sequence[int] | None = None, nodata: float | None = None, flips: bool = False,
                 train: bool = False, seed: int = 0, stats_source: str = "the normalization stats"):
        if not samples:
            raise DataError("no samples given to GeoTiffDataset: check the data.*_images globs")
        self.samples = list(samples)
        self.task = task
        self.temporal = task.kind.temporal
        self.nodata = nodata
        self.flips = flips and train
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.band_count = self._check_headers(bands)
        self.bands = list(bands) if bands else None
        self.mean, self.std = self._select_stats(np.asarray(mean, "float32"), np.asarray(std, "float32"), stats_source)

    def _check_headers(self, bands: Sequence[int] | None) -> int:
        first: TileHeader | None = None
        for sample in self.samples:
            dates = [read_header(p) for p in sample.images]
            for h in dates:
                first = first or h
                if h.count != first.count:
                    raise band_count_error(first.path, first.count, h.path, h.count)
                for b in bands or ():
                    if not 1 <= b <= h.count:
                        raise DataError(f"band mismatch: data.bands={list(bands)} asks for band {b} but {h.path} has "
                                        f"{h.count} bands; data.bands is 1-based, use values 1..{h.count}")
            for h in dates[1:]:
                if not same_grid(dates[0], h):
                    raise DataError(
                        f"dates are not co-registered: {dates[0].path} ({dates[0].crs}, {dates[0].height}x"
                        f"{dates[0].width}, {dates[0].transform}) vs {h.path} ({h.crs}, {h.height}x{h.width}, "
                        f"{h.transform}); resample all dates onto one grid (e.g. gdalwarp -tap)")
            label = read_header(sample.label)
            if (label.height, label.width) != (dates[0].height, dates[0].width):
                raise DataError(f"image/label shape mismatch: image {dates[0].path} is {dates[0].height}x"
                                f"{dates[0].width} but label {label.path} is {label.height}x{label.width}; "
                                "labels must cover the image pixel for pixel")
        return first.count

    def _select_stats(self, mean: np.ndarray, std: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
        n_sel = len(self.bands) if self.bands else self.band_count
        if len(mean) == self.band_count and self.bands:
            mean, std = mean[[b - 1 for b in self.bands]], std[[b - 1 for b in self.bands]]
        elif len(mean) != n_sel or len(std) != n_sel:
            raise DataError(f"{source} has {len(mean)} means/{len(std)} stds but the tiles have {self.band_count} "
                            f"bands ({n_sel} selected by data.bands): delete it to recompute, or fix data.stats")
        # A constant band has std 0; dividing by 1 instead leaves it centred rather than infinite.
        std = np.where(std > 0, std, 1.0).astype("float32")
        return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def flips_for(self, index: int) -> tuple[bool, bool]:
        """(horizontal, vertical) flip of sample `index` this epoch."""
        if not self.flips:
            return False, False
        h, v = item_rng(self.seed, self.epoch, index).random(2) < 0.5
        return bool(h), bool(v)

    def _read_image(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        image, file_nodata = read_tile(path, self.bands)
        bad = invalid_values(image, file_nodata, self.nodata)
        image = (image - self.mean) / self.std
        # A partial spectrum is not a spectrum: the whole pixel becomes 0, the band mean after normalization.
        pixel_bad = bad.any(axis=0)
        image[:, pixel_bad] = 0.0
        return image, pixel_bad

    def _read_label(self, path: str, image_bad: np.ndarray) -> np.ndarray:
        label, file_nodata = read_tile(path, [1])
        label = label[0]
        bad = invalid_values(label, file_nodata) | image_bad
        # trainer.data.checks scans every label before step 1; this guards tiles changed since
        wrong = wrong_values(label, bad, self.task)
        if wrong.any():
            raise label_range_error(path, np.unique(label[wrong]).tolist(), self.task)
        kind = self.task.kind
        return np.where(bad, kind.label_fill(self.task.ignore_index), label).astype(kind.label_dtype)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        dates, bad = zip(*(self._read_image(p) for p in sample.images))
        image = np.stack(dates) if self.temporal else dates[0]
        mask = self._read_label(sample.label, np.logical_or.reduce(bad))
        hflip, vflip = self.flips_for(index)
        if hflip:
            image, mask = image[..., ::-1], mask[..., ::-1]
        if vflip:
            image, mask = image[..., ::-1, :], mask[..., ::-1, :]
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype="float32")),
                "mask": torch.from_numpy(np.ascontiguousarray(mask))}
