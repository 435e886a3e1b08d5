"""`predict` for a job trained from a `terratorch fit` file: windows prepared the way its datamodule prepared tiles.

The model is the task's, rebuilt by TerraTorch from the export's config.yaml (`trainer.model.models.build_model` ->
`terratorch_task.build_task_model`) with the exported weights (`trainer.predict.inference.load_for_inference`). Each window
of the scene goes through what TerraTorch's generic pixel-wise datasets and datamodules do to a predict tile
(`GenericNonGeoSegmentationDataModule`, `GenericNonGeoPixelwiseRegressionDataModule`, from `data.init_args`):

- nodata / NaN pixels (rioxarray `masked=True`) replaced by `no_data_replace` (left NaN when it is unset);
- the bands `predict_output_bands` (else `output_bands`) picked from the file's `predict_dataset_bands` (else
  `dataset_bands`), intervals `[a, b]` expanded as TerraTorch expands them; all file bands when none are named;
- times `constant_scale`;
- the datamodule's batch normalization, TerraTorch's `Normalize(means, stds)` (means/stds lists or files).

Then `model(x).output`: segmentation logits (softmax, blended, argmax -> class ids), regression values as the
model returns them (no sigmoid: that is terrascale's own regression head). A pixel invalid in any band is nodata in
the output, as for terrascale-schema jobs. What this cannot reproduce is refused with a ConfigError (exit 2) naming
the key: another datamodule (multimodal ones take one input per modality), `expand_temporal_dimension`, a
`test_transform` other than ToTensorV2 (it would run per tile, not per window), quantized/bf16 `--precision`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from trainer.config import Experiment
from trainer.data.geotiff import TileHeader, invalid_values, read_header
from trainer.errors import ConfigError, DataError

# the datamodules whose predict tiles are one GeoTIFF each, prepared as this module prepares windows
DATAMODULES = {"GenericNonGeoSegmentationDataModule": "segmentation",
               "GenericNonGeoPixelwiseRegressionDataModule": "regression"}
_TO_TENSOR = "ToTensorV2"  # albumentations' HWC -> CHW, TerraTorch's default transform: changes no value


@dataclass(frozen=True)
class Preparation:
    """How the job's datamodule turned a file into model input."""

    datamodule: str
    file_bands: list[Any] | None  # what the file's bands are (predict_dataset_bands / dataset_bands)
    indices: list[int] | None  # 0-based file bands fed to the model, in order (None: all)
    scale: float
    nan_replace: float | None
    means: Any  # list, or a file TerraTorch reads (load_from_file_or_attribute); None: no normalization
    stds: Any

    def describe(self) -> str:
        bands = "all file bands" if self.indices is None else f"file bands {[i + 1 for i in self.indices]}"
        norm = "means/stds" if self.means is not None else "no normalization"
        return f"{self.datamodule} ({bands}, x{self.scale:g}, nodata -> {self.nan_replace}, {norm})"


def _short(class_path: Any) -> str:
    return str(class_path or "").rsplit(".", 1)[-1]


def _bands(value: Any) -> list[Any] | None:
    """TerraTorch's generate_bands_intervals on the raw YAML value: a pair of ints is an inclusive interval."""
    if value is None:
        return None
    out: list[Any] = []
    for item in value:
        if isinstance(item, (list, tuple)):
            if len(item) != 2 or not all(isinstance(i, int) for i in item):
                raise ConfigError([f"data.init_args bands: {item!r}: an interval is two integers [start, end]"])
            out.extend(range(item[0], item[1] + 1))
        else:
            out.append(item)
    return out


def preparation(exp: Experiment) -> Preparation:
    """The datamodule's window preparation from the export's config (no TerraTorch import), or the reasons
    `predict` cannot reproduce it (ConfigError naming each key)."""
    data = exp.terratorch.config.get("data") or {}
    name = _short(data.get("class_path"))
    init = data.get("init_args") or {}
    problems = []
    if name not in DATAMODULES:
        why = (" takes one input per modality (a dict of tensors) from files per modality; predict reads one GeoTIFF "
               "per scene" if "MultiModal" in name else " prepares its samples its own way, which predict cannot "
               "reproduce window by window")
        problems.append(f"data.class_path: {data.get('class_path')!r}{why}; predict supports TerraTorch-file jobs "
                        f"trained with {' or '.join(DATAMODULES)} (run `terratorch predict` for this job)")
    if init.get("expand_temporal_dimension"):
        problems.append("data.init_args.expand_temporal_dimension: true stacks dates into a time axis; predict feeds "
                        "one date per window")
    transforms = init.get("test_transform") or []
    others = [_short(t.get("class_path")) if isinstance(t, dict) else repr(t) for t in transforms
              if not (isinstance(t, dict) and _short(t.get("class_path")) == _TO_TENSOR)]
    if others:
        problems.append(f"data.init_args.test_transform: {others} would run on whole predict tiles, not on "
                        f"predict's overlapping windows; predict applies only {_TO_TENSOR} (remove the others)")
    if problems:
        raise ConfigError(problems, source=exp.terratorch.source)
    file_bands = _bands(init.get("predict_dataset_bands") or init.get("dataset_bands"))
    fed = _bands(init.get("predict_output_bands") or init.get("output_bands"))
    indices = None
    if fed:
        missing = [b for b in fed if file_bands is None or b not in file_bands]
        if missing:
            raise ConfigError([f"data.init_args.output_bands: {missing} are not among the dataset_bands "
                               f"{file_bands}; TerraTorch's dataset refuses this too"], source=exp.terratorch.source)
        indices = [file_bands.index(b) for b in fed]
    means, stds = init.get("means"), init.get("stds")
    if not (means and stds):
        means = stds = None
    no_data = init.get("no_data_replace")
    return Preparation(name, file_bands, indices, float(init.get("constant_scale", 1)),
                       None if no_data is None else float(no_data), means, stds)


def check_precision(precision: str | None) -> str:
    if precision not in (None, "fp32"):
        raise ConfigError([f"--precision {precision}: a TerraTorch-file job predicts in fp32 (terrascale's nf4/int8/"
                           "bf16 inference holds a terrascale-schema backbone); leave --precision out"])
    return "fp32"


def _training_band_count(exp: Experiment) -> int | None:
    """Bands of the job's first training tile (what the model was fed when no dataset_bands are named)."""
    init = (exp.terratorch.config.get("data") or {}).get("init_args") or {}
    root = init.get("train_data_root")
    if not isinstance(root, str):
        return None
    first = next(iter(sorted(Path(root).glob(str(init.get("img_grep") or "*")))), None)
    return None if first is None else read_header(str(first)).count


def check_inputs(paths: Sequence[Path], exp: Experiment, prep: Preparation) -> list[TileHeader]:
    """One readable, georeferenced scene with the bands the datamodule read (DataError naming the file)."""
    from trainer.predict.inputs import check_inputs as check_scene

    if len(paths) != 1:
        raise DataError(f"a TerraTorch-file job predicts one scene (--input), but {len(paths)} files were given: "
                        f"{list(map(str, paths))}")
    count = read_header(str(paths[0])).count
    headers = check_scene(paths, exp, count, 1)  # readable, georeferenced
    want, why = (len(prep.file_bands), "data.init_args.predict_dataset_bands / dataset_bands") if prep.file_bands else \
        (_training_band_count(exp), "the job's training tiles")
    if want is not None and count != want:
        raise DataError(f"wrong band count: {paths[0]} has {count} bands but the job's datamodule reads {want}-band "
                        f"files ({why}); give a scene with the same bands in the same order")
    fed = len(prep.indices) if prep.indices is not None else count
    for key, values in (("means", prep.means), ("stds", prep.stds)):
        if isinstance(values, list) and len(values) != fed:
            raise ConfigError([f"data.init_args.{key}: {len(values)} values for the {fed} bands fed to the model"],
                              source=exp.terratorch.source)
    return headers


class Reader:
    """Windows of the scene as the datamodule prepares predict tiles; same interface as `predict._Reader`."""

    def __init__(self, stack: contextlib.ExitStack, paths: Sequence[Path], prep: Preparation, tile: int):
        from terratorch.datamodules.utils import Normalize
        from terratorch.io.file import load_from_file_or_attribute

        self.src = stack.enter_context(rasterio.open(paths[0]))
        self.prep, self.tile = prep, tile
        self.normalize = None
        if prep.means is not None:
            means, stds = load_from_file_or_attribute(prep.means), load_from_file_or_attribute(prep.stds)
            fed = len(prep.indices) if prep.indices is not None else self.src.count
            if len(means) != fed or len(stds) != fed:  # means/stds given as files: known only now
                raise ConfigError([f"data.init_args.means/stds: {len(means)}/{len(stds)} values for the {fed} bands "
                                   "fed to the model"])
            self.normalize = Normalize(means, stds)

    def read(self, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """([1, C, tile, tile] float32, invalid [h, w]) for the window at (row, col), h/w clipped to the scene."""
        src, prep = self.src, self.prep
        h, w = min(self.tile, src.height - row), min(self.tile, src.width - col)
        arr = src.read(window=Window(col, row, w, h), out_dtype="float32")
        bad = invalid_values(arr, src.nodata)
        arr[bad] = np.nan if prep.nan_replace is None else prep.nan_replace
        if prep.indices is not None:
            arr = arr[prep.indices]
        arr = arr * np.float32(prep.scale)
        if self.normalize is not None:
            arr = self.normalize({"image": torch.from_numpy(arr)[None]})["image"][0].float().numpy()
        arr = np.pad(arr, ((0, 0), (0, self.tile - h), (0, self.tile - w)))
        return arr[None].astype("float32", copy=False), bad.any(axis=0)


def run(model, exp: Experiment, batch: list[np.ndarray]) -> np.ndarray:
    """The task model's output for a batch of windows: class probabilities [N, K, t, t] or values [N, 1, t, t]."""
    x = torch.from_numpy(np.stack(batch))[:, 0]
    kind = exp.task.kind
    # InferenceModel: inference_mode, ModelOutput.output. TerraTorch's pixel-wise regression squeezes its single
    # channel; kind.scores gives it back (classes: the softmax)
    out = kind.scores(model(x).float())
    if kind.continuous and (out.dim() != 4 or out.shape[1] != 1):
        raise DataError(f"the regression model returned shape {tuple(out.shape)}; predict writes one value per pixel")
    return out.cpu().numpy()
