"""Train/val datasets for an experiment: `build_datasets(exp) -> (train, val)`.

Every dataset returns {"image": float32 [C,H,W] ([T,C,H,W] for change detection), "mask": int64 [H,W]
(class ids, `task.ignore_index` where invalid) or float32 [H,W] (regression, NaN where invalid)}, is
normalized, picklable, and has `set_epoch(epoch)`; its random augmentation depends only on
(run.seed, epoch, index).

data.kind:
- synthetic: generates the dataset into data.root unless its train tiles already exist (see synthetic.py).
- geotiff: tiles found by the data.*_images/*_labels globs under data.root (layout in geotiff.py).
- terratorch: TerraTorch's own datamodule from data.terratorch; samples get the datamodule's batch
  normalization (`aug`, which Lightning would apply in `on_after_batch_transfer`).
"""
from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from trainer.config import Experiment, TaskConfig
from trainer.data.checks import check_labels
from trainer.data.geotiff import (GeoTiffDataset, Sample, band_count_error, find_samples, item_rng,
                                  read_header)
from trainer.data.stats import BandStats, compute_stats, load_or_compute_stats
from trainer.data.synthetic import generate_synthetic
from trainer.errors import ConfigError, DataError

__all__ = ["build_datasets", "build_terratorch_datasets", "GeoTiffDataset", "TerraTorchSamples", "Sample",
           "find_samples", "generate_synthetic", "load_or_compute_stats", "compute_stats", "BandStats"]


def build_datasets(exp: Experiment, *, is_main: bool = True,
                   barrier: Callable[[], None] | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) datasets. In a distributed run pass `is_main` and a `barrier` so only the main process
    writes synthetic tiles and stats; every rank must call this (each calls the barrier the same number of
    times). Without a barrier, concurrent writers are still safe: writes are atomic and deterministic."""
    data, task = exp.data, exp.task
    if data.kind == "terratorch":
        return build_terratorch_datasets(exp)
    root = Path(data.root)
    if data.kind == "synthetic":
        syn = data.synthetic
        if is_main or barrier is None:
            generate_synthetic(task.name, root, syn.n_train, syn.n_val, syn.tile_size, syn.num_bands, syn.seed,
                               num_dates=task.dates)
        if barrier is not None:
            barrier()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (or is not a folder): point data.root at the folder "
                        "holding train/ and val/, or use data.kind=synthetic to generate one")
    train = find_samples(root, data.train_images, data.train_labels, task.dates)
    val = find_samples(root, data.val_images, data.val_labels, task.dates)
    stats_path = Path(data.stats) if data.stats else root / "stats.json"
    # Before any step (and before stats read every image): a bad label would otherwise surface mid-epoch,
    # after a checkpoint was written. See trainer/data/checks.py for what it costs.
    check_labels(train + val, task, data.nodata, cache_dir=stats_path.parent)
    stats = load_or_compute_stats([p for s in train for p in s.images], stats_path, nodata=data.nodata,
                                  is_main=is_main, barrier=barrier)
    common: dict[str, Any] = dict(task=task, mean=stats.mean, std=stats.std, bands=data.bands, nodata=data.nodata,
                                  seed=exp.run.seed, stats_source=str(stats_path))
    # Each dataset checks its own tiles; this catches val tiles whose band count differs from train's.
    first_train, first_val = read_header(train[0].images[0]), read_header(val[0].images[0])
    if first_train.count != first_val.count:
        raise band_count_error(first_train.path, first_train.count, first_val.path, first_val.count)
    return (GeoTiffDataset(train, flips=data.flips, train=True, **common),
            GeoTiffDataset(val, flips=False, train=False, **common))


# ---------------------------------------------------------------------------------------------------
# TerraTorch datamodules


def _import_class(class_path: str) -> type:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"data.terratorch.class_path: cannot import {class_path!r} ({e}); give a dotted path such "
                          "as terratorch.datamodules.GenericNonGeoSegmentationDataModule") from e


def _batch_aug(datamodule: Any, split: str) -> Callable | None:
    """The transform torchgeo's `on_after_batch_transfer` applies to `split` batches (`<split>_aug` or `aug`)."""
    aug = getattr(datamodule, f"{split}_aug", None)
    if aug is None:
        aug = getattr(datamodule, "aug", None)
    # Without means/stds TerraTorch sets `aug = lambda x: x`; a lambda cannot be pickled into DataLoader
    # workers, and an identity has nothing to apply.
    if isinstance(aug, types.LambdaType) and aug.__name__ == "<lambda>":
        probe = {"image": torch.zeros(1)}
        if aug(probe) is probe and probe["image"].eq(0).all():
            return None
    return aug


def build_terratorch_datasets(exp: Experiment) -> tuple[Dataset, Dataset]:
    """Instantiate `data.terratorch` (class_path + init_args), `setup("fit")`, wrap its train/val datasets.

    `batch_size`/`num_workers` default to data.batch_size/num_workers when the datamodule takes them.
    """
    spec = exp.data.terratorch
    cls = _import_class(spec.class_path)
    args = dict(spec.init_args)
    params = inspect.signature(cls).parameters
    for key, value in (("batch_size", exp.data.batch_size), ("num_workers", exp.data.num_workers)):
        if key in params:
            args.setdefault(key, value)
    datamodule = cls(**args)
    datamodule.setup("fit")
    return (TerraTorchSamples(datamodule.train_dataset, _batch_aug(datamodule, "train"), exp.task, exp.run.seed, True),
            TerraTorchSamples(datamodule.val_dataset, _batch_aug(datamodule, "val"), exp.task, exp.run.seed, False))


class TerraTorchSamples(Dataset):
    """A TerraTorch dataset whose samples follow our format, normalized as its datamodule would.

    TerraTorch normalizes whole batches after device transfer (`aug` in `on_after_batch_transfer`, which
    only runs under a Lightning Trainer). Its Normalize is per-sample, so applying `aug` to a batch of one
    here gives the same values. Randomness is pinned per (seed, epoch, index): the albumentations pipeline
    gets that seed, and `aug` runs under a forked torch RNG seeded with it.
    """

    def __init__(self, dataset: Dataset, aug: Callable | None, task: TaskConfig, seed: int = 0, train: bool = False):
        self.dataset = dataset
        self.aug = aug
        self.task = task
        self.seed = seed
        self.train = train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed = int(item_rng(self.seed, self.epoch, index).integers(2**31))
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)
        sample = self.dataset[index]
        batch = {k: sample[k][None] for k in ("image", "mask") if isinstance(sample.get(k), torch.Tensor)}
        if self.aug is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                batch = self.aug(batch)
        image, mask = batch["image"][0].float(), batch["mask"][0]
        if self.task.kind.temporal:
            if image.dim() != 4:
                raise DataError(f"change detection needs images with a time axis but {sample.get('filename')} gives "
                                f"shape {tuple(image.shape)}: set expand_temporal_dimension: true (and dataset_bands) "
                                "in data.terratorch.init_args")
            image = image.permute(1, 0, 2, 3)  # TerraTorch's [C, T, H, W] → our [T, C, H, W]
        # TerraTorch reads nodata as NaN (rioxarray masked=True) unless no_data_replace is set.
        bad = torch.isnan(image).flatten(0, -3).any(0)
        image = image.masked_fill(bad, 0.0)
        if self.task.kind.continuous:
            # TerraTorch regression configs mark invalid targets with no_label_replace (= the task's
            # ignore_index); our format marks them NaN.
            mask = mask.float()
            mask = mask.masked_fill(bad | (mask == self.task.ignore_index), float("nan"))
        else:
            mask = mask.long().masked_fill(bad, self.task.ignore_index)
        return {"image": image.contiguous(), "mask": mask.contiguous()}
