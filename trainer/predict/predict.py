"""Sliding-window inference of a trained job over a scene far larger than a tile: `predict_scene(...)`.

- Model: the job's `export/` through `trainer.predict.inference.load_for_inference` at `precision` (nf4, int8, bf16,
  fp32; default what the job trained with): for LoRA/QLoRA jobs the base checkpoint streamed (fingerprint
  checked) with the export's adapters, necks, decoder and head on top; full exports as they are. Normalization:
  `export/stats.json`, else the stats file the job's config names; a job trained from a `terratorch fit` file
  prepares windows as its datamodule did (trainer.predict.terratorch_predict). `predict_loaded` predicts with a model
  loaded once (several scenes, benchmarks).
- Windows per forward pass: `batch_size`, or None to fit the device (`trainer.predict.inference.windows_per_batch`).
- Windows of `tile` px overlap by `overlap` px; the last row/column of windows is moved flush with the scene's
  edge, so every window is a whole tile (a scene smaller than a tile is zero-padded, i.e. filled with the band
  mean). Each window's output is weighted by a tapered cosine (1 inside, falling towards 0 over the `overlap`
  px at its edges) and the weighted sum is divided by the summed weights: a pixel seen by one window gets
  exactly that window's output, and seams blend instead of showing tile edges.
- Memory: windows are processed one row of windows (a strip) at a time; the accumulators hold `tile` rows x
  the scene width x outputs, and rows are written out as soon as no later window touches them. Peak memory
  does not depend on the scene's height and grows linearly with its width.
- Output: a GeoTIFF with the input's CRS and transform: class ids uint8 (nodata 255), or with `probabilities`
  one float32 band per class; regression writes coherence float32. Float nodata is NaN. A pixel invalid in any
  input date (NaN, nodata tag, data.nodata) is nodata. A PNG quicklook (bands as RGB, prediction overlaid)
  goes next to it.
- Bad input (unreadable, no CRS, wrong band count, dates off one grid) is a DataError naming the file, raised
  before the model is built. Outputs are written under temporary names and renamed at the end.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.windows import Window

from trainer.config import Experiment, load_experiment
from trainer.data.geotiff import invalid_values
from trainer.data.stats import read_stats
from trainer.errors import ConfigError, DataError
from trainer.predict.inputs import check_inputs

log = logging.getLogger(__name__)

CLASS_NODATA = 255
STATS_NAME = "stats.json"
QUICKLOOK_PX = 1024  # long side of each quicklook panel: decimated reads keep it bounded for any scene


@dataclass(frozen=True)
class Prediction:
    out: Path
    quicklook: Path | None
    windows: int
    shape: tuple[int, int]
    batch_size: int = 0
    seconds: float = 0.0  # the window loop (reading, forward passes, blending, writing)
    precision: str = ""


def resolve_export(job: Path) -> Path:
    """A job dir (with export/) or the export dir itself."""
    from trainer.train.export import is_exported

    for cand in (job / "export", job):
        if is_exported(cand):
            return cand
    raise DataError(f"--job {job}: no exported model there (need export/config.yaml and export/model.safetensors); "
                    "give a finished job dir or its export/ dir (`terrascale export` writes one from a checkpoint)")


def load_stats(export: Path, exp: Experiment) -> tuple[np.ndarray, np.ndarray, str]:
    from trainer.train.export import stats_file

    path = export / STATS_NAME if (export / STATS_NAME).is_file() else stats_file(exp)
    if path is None:
        raise DataError(f"{export}: no {STATS_NAME} beside the exported model and none at the job's data.stats / "
                        "data.root: predict must normalize bands exactly as training did; copy the job's stats.json "
                        f"into {export}")
    stats = read_stats(path)
    return np.asarray(stats.mean, "float32"), np.asarray(stats.std, "float32"), str(path)


def offsets(n: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every `stride` px, the last one flush with the edge."""
    if n <= tile:
        return [0]
    return sorted(set(range(0, n - tile, stride)) | {n - tile})


def taper(tile: int, overlap: int) -> np.ndarray:
    """1 in the middle, a half cosine over `overlap` px at each end; strictly positive (a window alone at a
    scene edge still counts, and blended pixels are a weighted mean of the windows covering them)."""
    w = np.ones(tile, "float32")
    if overlap:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        w[:overlap] = ramp
        w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return w


class _Reader:
    """Windows of every date, normalized as in training (GeoTiffDataset): bad pixels → 0 = the band mean."""

    def __init__(self, stack: contextlib.ExitStack, paths: Sequence[Path], exp: Experiment, mean, std, tile: int):
        self.srcs = [stack.enter_context(rasterio.open(p)) for p in paths]
        self.bands = list(exp.data.bands) if exp.data.bands else None
        self.nodata, self.tile = exp.data.nodata, tile
        count = self.srcs[0].count
        if self.bands and len(mean) == count:
            mean, std = mean[[b - 1 for b in self.bands]], std[[b - 1 for b in self.bands]]
        self.mean, self.std = mean.reshape(-1, 1, 1), np.where(std > 0, std, 1.0).astype("float32").reshape(-1, 1, 1)

    def read(self, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """([T, C, tile, tile] float32, invalid [h, w]) for the window at (row, col), h/w clipped to the scene."""
        src0 = self.srcs[0]
        h, w = min(self.tile, src0.height - row), min(self.tile, src0.width - col)
        dates, bad_any = [], np.zeros((h, w), bool)
        for src in self.srcs:
            arr = src.read(indexes=self.bands, window=Window(col, row, w, h), out_dtype="float32")
            bad = invalid_values(arr, src.nodata, self.nodata).any(axis=0)
            arr = (arr - self.mean) / self.std
            arr[:, bad] = 0.0
            bad_any |= bad
            dates.append(np.pad(arr, ((0, 0), (0, self.tile - h), (0, self.tile - w))))
        return np.stack(dates), bad_any


def _run(model, exp: Experiment, batch: list[np.ndarray], temporal: bool) -> np.ndarray:
    """Model outputs for a batch of windows: class probabilities [N, K, t, t] or coherence [N, 1, t, t]."""
    from trainer.model.models import model_output

    x = torch.from_numpy(np.stack(batch))
    if not temporal:
        x = x[:, 0]
    with torch.inference_mode():
        out = model_output(model(x)).float()  # regression: the head's sigmoid already bounds it
    out = exp.task.kind.scores(out)  # class probabilities, or coherence with a channel axis
    return out.cpu().numpy()


def _write_rows(dst, acc: np.ndarray, wsum: np.ndarray, bad: np.ndarray, top: int, n: int, mode: str) -> None:
    values = acc[:, :n] / wsum[None, :n]
    if mode == "classes":
        out = values.argmax(axis=0).astype("uint8")[None]
        out[:, bad[:n]] = CLASS_NODATA
    else:
        out = values.astype("float32")
        out[:, bad[:n]] = np.nan
    dst.write(out, window=Window(0, top, out.shape[2], n))


def _check_options(tile: int, overlap: int, batch_size: int | None) -> None:
    if tile < 1 or not 0 <= overlap <= tile // 2 or (batch_size is not None and batch_size < 1):
        raise ConfigError(f"--tile {tile} --overlap {overlap} --batch-size {batch_size}: need tile >= 1, "
                          "0 <= overlap <= tile/2 (so each window keeps a centre no other window blends into), "
                          "batch size >= 1 (or auto)")


def predict_scene(job: Path, inputs: Sequence[Path], out: Path, *, tile: int = 64, overlap: int = 16,
                  batch_size: int | None = 4, probabilities: bool = False, quicklook: Path | None = None,
                  precision: str | None = None, base: str | None = None) -> Prediction:
    """Load the job's model (`precision`, `base`: see trainer.predict.inference) and predict one scene. Inputs are checked
    before the model is loaded."""
    from trainer.model.temporal import temporal_settings
    from trainer.predict.inference import load_for_inference
    from trainer.runtime import gc_after_start_up

    job, out, inputs = Path(job), Path(out), [Path(p) for p in inputs]
    _check_options(tile, overlap, batch_size)
    if out.resolve() in {p.resolve() for p in inputs}:
        raise DataError(f"--out {out} is one of the inputs: choose another output path")
    export = resolve_export(job)
    exp = load_experiment(export / "config.yaml")
    temporal = exp.task.kind.temporal
    if exp.terratorch is not None:  # a `terratorch fit` file's job: windows prepared as its datamodule did
        from trainer.predict import terratorch_predict
        precision = terratorch_predict.check_precision(precision)
        terratorch_predict.check_inputs(inputs, exp, terratorch_predict.preparation(exp))
    else:
        mean, _, _ = load_stats(export, exp)
        check_inputs(inputs, exp, len(mean), temporal_settings(exp.task).num_dates if temporal else 1)
    model = load_for_inference(export, precision, base=base)
    gc_after_start_up()
    return predict_loaded(model, inputs, out, tile=tile, overlap=overlap, batch_size=batch_size,
                          probabilities=probabilities, quicklook=quicklook)


def predict_loaded(model, inputs: Sequence[Path], out: Path, *, tile: int = 64, overlap: int = 16,
                   batch_size: int | None = 4, probabilities: bool = False,
                   quicklook: Path | None = None) -> Prediction:
    """Predict one scene with a loaded `trainer.predict.inference.InferenceModel`; `batch_size` None fits the device."""
    import time

    from trainer.model.temporal import temporal_settings

    out, inputs = Path(out), [Path(p) for p in inputs]
    _check_options(tile, overlap, batch_size)
    export, exp = model.export, model.exp
    task = exp.task
    temporal = task.kind.temporal
    num_dates = temporal_settings(task).num_dates if temporal else 1
    tt = None
    if exp.terratorch is not None:  # trainer.predict.terratorch_predict: the datamodule's preparation, the task's model
        from trainer.predict import terratorch_predict as tt
        prep = tt.preparation(exp)
        headers, stats_path = tt.check_inputs(inputs, exp, prep), prep.describe()
    else:
        mean, std, stats_path = load_stats(export, exp)
        headers = check_inputs(inputs, exp, len(mean), num_dates)
    height, width = headers[0].height, headers[0].width
    if task.kind.continuous:
        mode, nbands = "coherence", 1
    elif probabilities:
        mode, nbands = "probabilities", task.num_classes
    else:
        mode, nbands = "classes", 1
    log.info("predicting %s (%dx%d, %d date(s)) with %s (%s), stats %s, %s output", inputs[0], height, width,
             num_dates, export, model.precision, stats_path, mode)

    stride = tile - overlap
    rows, cols = offsets(height, tile, stride), offsets(width, tile, stride)
    w1 = taper(tile, overlap)
    weight = w1[:, None] * w1[None, :]
    k = task.kind.out_channels(task.num_classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with rasterio.open(inputs[0]) as ref:
        profile = dict(driver="GTiff", height=height, width=width, count=nbands, crs=ref.crs, transform=ref.transform,
                       dtype="uint8" if mode == "classes" else "float32", compress="deflate", BIGTIFF="IF_SAFER",
                       nodata=CLASS_NODATA if mode == "classes" else float("nan"))
    try:
        with contextlib.ExitStack() as stack:
            reader = tt.Reader(stack, inputs, prep, tile) if tt else _Reader(stack, inputs, exp, mean, std, tile)
            if batch_size is None:
                from trainer.predict.inference import windows_per_batch

                first = reader.read(rows[0], cols[0])[0]
                sample = torch.from_numpy(first[None] if temporal else first[:1])
                batch_size = windows_per_batch(model, sample)
            try:
                dst = stack.enter_context(rasterio.open(tmp, "w", **profile))
            except rasterio.errors.RasterioIOError as e:
                raise DataError(f"cannot write --out {out} ({e}): check the folder exists and is writable") from e
            from trainer.train.export import backbone_name

            value = "value" if tt else "coherence"  # a TerraTorch regression task's target is the file's own
            dst.update_tags(task=task.name, backbone=backbone_name(exp), job=str(export),
                            output=value if mode == "coherence" else mode, precision=model.precision)
            names = {"classes": ["class"], "coherence": [value]}.get(mode, [f"p_class_{i}" for i in range(nbands)])
            for i, name in enumerate(names, start=1):
                dst.set_band_description(i, name)
            acc = np.zeros((k, tile, width), "float32")
            wsum = np.zeros((tile, width), "float32")
            bad = np.zeros((tile, width), bool)
            top = 0
            t0 = time.perf_counter()
            bar = _progress(len(rows) * len(cols))
            for row in rows:
                shift = row - top  # rows above `row` get no more windows: write them, slide the buffers up
                if shift:
                    _write_rows(dst, acc, wsum, bad, top, shift, mode)
                    for buf in (acc, wsum, bad):
                        buf[..., :tile - shift, :] = buf[..., shift:, :].copy()
                        buf[..., tile - shift:, :] = 0
                    top = row
                for start in range(0, len(cols), batch_size):
                    chunk = cols[start:start + batch_size]
                    windows = [reader.read(row, col) for col in chunk]
                    batch = [w[0] for w in windows]
                    probs = tt.run(model, exp, batch) if tt else _run(model, exp, batch, temporal)
                    for col, (_, bad_w), p in zip(chunk, windows, probs):
                        h, w = bad_w.shape
                        acc[:, :h, col:col + w] += p[:, :h, :w] * weight[:h, :w]
                        wsum[:h, col:col + w] += weight[:h, :w]
                        bad[:h, col:col + w] |= bad_w
                    bar.update(len(chunk))
            _write_rows(dst, acc, wsum, bad, top, height - top, mode)
            bar.close()
            seconds = time.perf_counter() - t0
        look = None
        if quicklook is not None:
            look = write_quicklook(inputs[-1], tmp, Path(quicklook), exp, mode)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Prediction(out, look, len(rows) * len(cols), (height, width), batch_size, seconds, model.precision)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predicting", unit="window", disable=total < 20, leave=False)


# ---------------------------------------------------------------------------------------------------
# Quicklook


_RGB_NAMES = ({"RED", "B4", "B04"}, {"GREEN", "B3", "B03"}, {"BLUE", "B2", "B02"})


def rgb_bands(src, exp: Experiment) -> list[int]:
    """1-based file bands shown as R, G, B: by band description, else by the model's band names, else the first
    bands (SAR VV/VH: VV, VH, VV)."""
    described = [str(d or "").upper() for d in src.descriptions]
    model_names = [str(b).upper() for b in exp.model.backbone_kwargs.get("bands") or []]
    # The model's names follow data.bands (the selection it was fed); descriptions follow the file.
    for names, file_band in ((described, lambda i: i + 1),
                             (model_names, lambda i: exp.data.bands[i] if exp.data.bands else i + 1)):
        hits = [next((i for i, n in enumerate(names) if n in want), None) for want in _RGB_NAMES]
        if None not in hits:
            return [file_band(i) for i in hits]
    return [1, 2, 3] if src.count >= 3 else [1, min(2, src.count), 1]


def _stretch(arr: np.ndarray, bad: np.ndarray) -> np.ndarray:
    out = np.zeros(arr.shape, "float32")
    for i, band in enumerate(arr):
        valid = band[~bad]
        if valid.size:
            lo, hi = np.percentile(valid, [2, 98])
            out[i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    out[:, bad] = 0
    return out.transpose(1, 2, 0)


def write_quicklook(image: Path, pred: Path, out: Path, exp: Experiment, mode: str) -> Path:
    """Two panels: the scene's bands as RGB, and the prediction over it. Both read decimated (bounded memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    with rasterio.open(image) as src, rasterio.open(pred) as p:
        scale = max(src.height, src.width) / QUICKLOOK_PX
        shape = (max(1, round(src.height / max(scale, 1))), max(1, round(src.width / max(scale, 1))))
        bands = rgb_bands(src, exp)
        arr = src.read(indexes=bands, out_shape=(len(bands), *shape), out_dtype="float32")
        rgb = _stretch(arr, invalid_values(arr, src.nodata, exp.data.nodata).any(axis=0))
        pv = p.read(1 if mode != "probabilities" else p.count, out_shape=shape)
    height, width = shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * width / 100 + 1.2, height / 100 + 0.6), dpi=100, squeeze=True)
    axes[0].imshow(rgb)
    axes[0].set_title(f"{image.name}: bands {bands} as RGB", fontsize=8)
    axes[1].imshow(rgb)
    if mode == "classes":
        k = exp.task.num_classes
        colors = [(0, 0, 0, 0)] + [(*plt.get_cmap("tab10")((i + 2) % 10)[:3], 0.55) for i in range(1, k)]
        shown = np.ma.masked_where((pv == 0) | (pv == CLASS_NODATA), pv)
        axes[1].imshow(shown, cmap=ListedColormap(colors), vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
        shown_classes = "class 1" if k == 2 else f"classes 1..{k - 1}"
        axes[1].set_title(f"{exp.task.name}: {shown_classes} coloured", fontsize=8)
    else:
        label = "coherence" if mode == "coherence" else f"p(class {exp.task.num_classes - 1})"
        lo, hi = 0.0, 1.0
        if mode == "coherence" and exp.terratorch is not None:  # a TerraTorch regression target: any range
            label = "value"
            finite = pv[np.isfinite(pv)]
            lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        im = axes[1].imshow(np.ma.masked_invalid(pv), cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6), alpha=0.75)
        fig.colorbar(im, ax=axes[1], fraction=0.04, pad=0.01, label=label)
        axes[1].set_title(f"{exp.task.name}: {label}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    from trainer.train.report import save_figure

    return save_figure(fig, out)
