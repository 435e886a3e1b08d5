"""A small georeferenced dataset for each task, learnable from its bands, generated in about a second.

Tiles are EPSG:32650 (UTM 50N, northern Borneo) at 10 m, each at its own offset on a grid; val tiles sit
east of the train tiles so the two never overlap. Layout is the one `geotiff.py` documents, plus
`stats.json` (train-set band stats) and `synthetic.json` (the parameters, to refuse a mismatched reuse).

- segmentation: Sentinel-2 L2A-like uint16 reflectance (x 1e4, scale tag 1e-4, nodata 0); disturbed
  blobs lose NIR and gain SWIR (label 1), intact forest is 0, nodata 255 where a swath edge cuts the tile.
- regression: Sentinel-1 VV/VH backscatter in dB (float32, nodata -9999); target = InSAR coherence, a
  smooth sigmoid of VV and the VH-VV ratio plus noise, in [0, 1], NaN where masked. Bands beyond 2 are
  VV/VH of further repeat-pass dates (independent speckle).
- change_detection: T dates `<tile>_t0 ... _t<T-1>` (default 2) of S2 bands; clearings that appear after t0
  are change (1), each region at one of the later dates; older clearings present at every date are not.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from trainer.config import TASK_KINDS, TaskKind
from trainer.data.stats import compute_stats, write_stats
from trainer.errors import DataError

CRS_UTM50N = "EPSG:32650"
PIXEL_M = 10.0
TRAIN_ORIGIN = (500_000.0, 620_000.0)  # easting, northing of the top-left tile (near Sandakan, Sabah)
GRID_COLS = 16
# (band, intact forest reflectance, cleared/bare reflectance): clearing lowers NIR, raises SWIR and red.
S2_BANDS = (("B2", 0.030, 0.070), ("B3", 0.055, 0.095), ("B4", 0.030, 0.110), ("B8", 0.320, 0.200),
            ("B11", 0.150, 0.290), ("B12", 0.065, 0.210), ("B5", 0.090, 0.140), ("B6", 0.240, 0.170),
            ("B7", 0.290, 0.190), ("B8A", 0.330, 0.210))
S2_NODATA = 0
LABEL_NODATA = 255
S1_NODATA = -9999.0


def _smooth(rng: np.random.Generator, size: int, waves: int = 3) -> np.ndarray:
    """A smooth field in about [-1, 1]: a sum of a few random plane waves (terrain, moisture)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size))
    for _ in range(waves):
        fx, fy = rng.uniform(-2, 2, 2)
        out += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
    return out / np.sqrt(waves)


def _blobs(rng: np.random.Generator, size: int, max_blobs: int, edge: np.ndarray) -> np.ndarray:
    """Union of 0..max_blobs ragged ellipses (clearings)."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(0, max_blobs + 1)):
        cy, cx = rng.uniform(0, size, 2)
        ay, ax = rng.uniform(0.1, 0.3, 2) * size
        mask |= ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 + 0.4 * edge < 1.0
    return mask


def _swath_edge(rng: np.random.Generator, size: int, p: float = 0.25) -> np.ndarray:
    """Pixels beyond a diagonal swath edge in about a quarter of the tiles."""
    if rng.random() >= p:
        return np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size]
    return xx + rng.uniform(-0.5, 0.5) * yy > rng.uniform(0.7, 0.95) * size


def _reflectance(rng: np.random.Generator, num_bands: int, cleared: np.ndarray, size: int) -> np.ndarray:
    """[C, H, W] reflectance: forest/cleared mix, per-tile clearing degree, illumination, sensor noise."""
    table = np.array([S2_BANDS[i % len(S2_BANDS)][1:] for i in range(num_bands)])  # [C, 2]
    degree = np.where(cleared, rng.uniform(0.6, 1.0), 0.0)  # regrowth makes some clearings less bare
    refl = table[:, :1, None] * (1 - degree) + table[:, 1:, None] * degree
    illumination = 1.0 + 0.12 * _smooth(rng, size)
    return refl * illumination + rng.normal(0, 0.008, refl.shape)


def _to_dn(refl: np.ndarray, nodata: np.ndarray) -> np.ndarray:
    dn = np.clip(np.round(refl * 10_000), 1, 65_535).astype("uint16")
    dn[:, nodata] = S2_NODATA
    return dn


def _label(mask: np.ndarray, nodata: np.ndarray) -> np.ndarray:
    out = mask.astype("uint8")
    out[nodata] = LABEL_NODATA
    return out[None]


def _segmentation(rng, size, num_bands):
    edge = _smooth(rng, size, waves=6)
    cleared = _blobs(rng, size, 4, edge)
    nodata = _swath_edge(rng, size)
    return {"": _to_dn(_reflectance(rng, num_bands, cleared, size), nodata)}, _label(cleared, nodata)


def _change(rng, size, num_bands, num_dates=2):
    old = _blobs(rng, size, 2, _smooth(rng, size, waves=6))
    new = _blobs(rng, size, 3, _smooth(rng, size, waves=6)) & ~old
    nodata = _swath_edge(rng, size, p=0.15)  # a cloud mask on the last date
    # With more than two dates each region of new clearings appears at one later date (a smooth field picks
    # which); drawn only then, so two-date tiles stay what they were.
    appear = (np.ones((size, size), int) if num_dates == 2 else
              1 + np.clip(((_smooth(rng, size) + 1) / 2 * (num_dates - 1)).astype(int), 0, num_dates - 2))
    none = np.zeros_like(nodata)
    dates = {"_t0": _to_dn(_reflectance(rng, num_bands, old, size), none)}
    for t in range(1, num_dates):
        # other sun angle, atmosphere at every date
        refl = _reflectance(rng, num_bands, old | (new & (appear <= t)), size) * rng.uniform(0.95, 1.05)
        dates[f"_t{t}"] = _to_dn(refl, nodata if t == num_dates - 1 else none)
    return dates, _label(new, nodata)


def _regression(rng, size, num_bands):
    vv = -11.0 + 3.0 * _smooth(rng, size) + rng.normal(0, 0.5, (size, size))
    ratio = -6.5 + 1.5 * _smooth(rng, size) + rng.normal(0, 0.4, (size, size))  # VH - VV in dB
    # Bright, low-cross-pol surfaces (bare, built) stay coherent; vegetation volume scattering decorrelates.
    coherence = 1 / (1 + np.exp(-(0.8 * (vv + 11.0) - 1.2 * (ratio + 6.5))))
    coherence = np.clip(coherence + rng.normal(0, 0.03, coherence.shape), 0, 1)
    bands = [vv, vv + ratio]
    while len(bands) < num_bands:  # later repeat passes: same surface, fresh speckle
        bands.append(bands[len(bands) % 2] + rng.normal(0, 1.0, (size, size)))
    image = np.stack(bands[:num_bands]).astype("float32")
    nodata = _swath_edge(rng, size)
    image[:, nodata] = S1_NODATA
    target = coherence.astype("float32")
    target[nodata | (rng.random((size, size)) < 0.02)] = np.nan  # plus layover/shadow masked in the product
    return {"": image}, target[None]


def _scene(kind: TaskKind, rng, size: int, num_bands: int, num_dates: int):
    """({file suffix: image}, label) of one tile: dates of a clearing (temporal), an InSAR coherence scene
    (continuous target), a forest disturbance scene (classes)."""
    if kind.temporal:
        return _change(rng, size, num_bands, num_dates)
    return (_regression if kind.continuous else _segmentation)(rng, size, num_bands)


def _write(path: Path, data: np.ndarray, transform, crs: CRS, nodata, descriptions=None, scale=None) -> None:
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
        if scale is not None:
            dst.scales = (scale,) * data.shape[0]


def _write_split(kind: TaskKind, out: Path, split: str, n: int, size: int, num_bands: int, rng, origin,
                 num_dates: int) -> list[Path]:
    (out / split / "images").mkdir(parents=True)
    (out / split / "labels").mkdir(parents=True)
    crs = CRS.from_string(CRS_UTM50N)
    if kind.continuous:  # Sentinel-1 backscatter, a coherence target NaN where invalid
        names = [f"{p}_{d}" for d in range((num_bands + 1) // 2) for p in ("VV", "VH")][:num_bands]
        img_nodata, label_nodata, scale = S1_NODATA, float("nan"), None
    else:
        names = [S2_BANDS[i % len(S2_BANDS)][0] for i in range(num_bands)]
        img_nodata, label_nodata, scale = S2_NODATA, LABEL_NODATA, 1e-4
    images = []
    for i in range(n):
        row, col = divmod(i, GRID_COLS)
        # North-up: x grows east, y shrinks south.
        transform = Affine(PIXEL_M, 0.0, origin[0] + col * size * PIXEL_M, 0.0, -PIXEL_M, origin[1] - row * size * PIXEL_M)
        dates, label = _scene(kind, rng, size, num_bands, num_dates)
        tile = f"tile_{i:04d}"
        for suffix, data in dates.items():
            path = out / split / "images" / f"{tile}{suffix}.tif"
            _write(path, data, transform, crs, img_nodata, names, scale)
            images.append(path)
        _write(out / split / "labels" / f"{tile}.tif", label, transform, crs, label_nodata)
    return images


def _has_tiles(root: Path) -> bool:
    return (root / "train" / "images").is_dir() and any((root / "train" / "images").iterdir())


def generate_synthetic(task: str, root: str | Path, n_train: int = 64, n_val: int = 16, tile_size: int = 64,
                       num_bands: int = 6, seed: int = 0, num_dates: int = 2) -> Path:
    """Write the dataset into `root` atomically: built in a sibling temp dir, then renamed into place.

    When two processes race, the first rename wins and the loser discards its copy and uses the winner's
    (same seed, same bytes). Returns `root`.
    """
    if task not in TASK_KINDS:
        raise DataError(f"no synthetic generator for task {task!r}: use one of {sorted(TASK_KINDS)}")
    kind = TASK_KINDS[task]
    root = Path(root)
    params = {"task": task, "n_train": n_train, "n_val": n_val, "tile_size": tile_size, "num_bands": num_bands,
              "seed": seed}
    if kind.temporal and num_dates != 2:  # absent for two dates: folders made before stay valid
        params["num_dates"] = num_dates
    if not _has_tiles(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            rng = np.random.default_rng(seed)
            train = _write_split(kind, tmp, "train", n_train, tile_size, num_bands, rng, TRAIN_ORIGIN, num_dates)
            val_origin = (TRAIN_ORIGIN[0] + (GRID_COLS * tile_size + 100) * PIXEL_M, TRAIN_ORIGIN[1])
            _write_split(kind, tmp, "val", n_val, tile_size, num_bands, rng, val_origin, num_dates)
            write_stats(tmp / "stats.json", compute_stats(train))
            (tmp / "synthetic.json").write_text(json.dumps(params, indent=2))
            try:
                # rename() onto a missing or empty directory is atomic; onto a full one it fails.
                os.rename(tmp, root)
            except OSError as e:
                if not _has_tiles(root):
                    raise DataError(f"data.root {root} exists and is not empty but holds no synthetic tiles: "
                                    "empty it or point data.root at a new folder") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_params(root, params)
    return root


def _check_params(root: Path, params: dict) -> None:
    """Refuse to train on synthetic data made with other parameters than the config asks for."""
    path = root / "synthetic.json"
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{root} holds tiles but no readable synthetic.json ({e!r}): it is not a synthetic dataset; "
                        "use data.kind=geotiff for it or point data.root at a new folder") from e
    if found != params:
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        raise DataError(f"synthetic data in {root} was generated with other parameters {diff} (found, wanted): "
                        "delete the folder to regenerate or point data.root at a new folder")
