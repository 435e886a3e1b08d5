"""Data layer: GeoTIFF datasets, stats, synthetic generation, TerraTorch datamodules (real tiles in tmp_path)."""
from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine

import trainer.data.synthetic as synthetic
from tests.integration.helpers import run_python
from trainer.config import Experiment
from trainer.data import build_datasets, generate_synthetic
from trainer.data.geotiff import GeoTiffDataset, find_samples
from trainer.data.stats import compute_stats, load_or_compute_stats, read_stats
from trainer.errors import DataError


def write_tif(path: Path, arr: np.ndarray, nodata=None, x0: float = 500_000.0, crs: str = "EPSG:32650") -> Path:
    arr = np.asarray(arr)
    arr = arr[None] if arr.ndim == 2 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0],
                       dtype=arr.dtype, crs=crs, transform=Affine(10.0, 0.0, x0, 0.0, -10.0, 600_000.0), nodata=nodata) as dst:
        dst.write(arr)
    return path


def make_tiles(root: Path, n_train: int = 2, n_val: int = 1, bands: int = 3, size: int = 8, task: str = "segmentation",
               seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            dates = ["_t0", "_t1"] if task == "change_detection" else [""]
            for d in dates:
                write_tif(root / split / "images" / f"tile{i}{d}.tif", rng.uniform(0, 100, (bands, size, size)).astype("float32"))
            label = rng.uniform(0, 1, (size, size)).astype("float32") if task == "regression" else \
                rng.integers(0, 2, (size, size)).astype("uint8")
            write_tif(root / split / "labels" / f"tile{i}.tif", label)
    return root


def experiment(root: Path, task: str = "segmentation", **data) -> Experiment:
    loss = "mse" if task == "regression" else "ce"
    return Experiment.model_validate({"task": {"name": task, "loss": loss},
                                      "data": {"kind": "geotiff", "root": str(root), **data}})


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read().astype("float32")


# ---------------------------------------------------------------------------------------------------
# GeoTIFF datasets


def test_geotiff_sample_format_and_normalization(tmp_path):
    root = make_tiles(tmp_path / "d")
    train, val = build_datasets(experiment(root, flips=False))
    raw = np.stack([read(root / "train" / "images" / f"tile{i}.tif") for i in range(2)])
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    stats = json.loads((root / "stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-4)
    s = train[1]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 8, 8)
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == (8, 8)
    np.testing.assert_allclose(s["image"].numpy(), (raw[1] - mean[:, None, None]) / std[:, None, None], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(s["mask"].numpy(), read(root / "train" / "labels" / "tile1.tif")[0])
    assert len(val) == 1
    assert torch.equal(pickle.loads(pickle.dumps(train))[1]["image"], s["image"])


def test_band_selection_uses_matching_stats(tmp_path):
    root = make_tiles(tmp_path / "d")
    train, _ = build_datasets(experiment(root, bands=[3, 1], flips=False))
    raw = np.stack([read(root / "train" / "images" / f"tile{i}.tif") for i in range(2)])[:, [2, 0]]
    expect = (raw[0] - raw.mean(axis=(0, 2, 3))[:, None, None]) / raw.std(axis=(0, 2, 3))[:, None, None]
    np.testing.assert_allclose(train[0]["image"].numpy(), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["segmentation", "regression"])
def test_nodata_zeroes_image_and_invalidates_label(tmp_path, task):
    root = make_tiles(tmp_path / "d", task=task)
    img = read(root / "train" / "images" / "tile0.tif")
    img[0, 0, 0] = -9999.0  # the file's nodata tag
    img[1, 0, 1] = np.nan
    img[2, 0, 2] = 7.0  # data.nodata
    write_tif(root / "train" / "images" / "tile0.tif", img, nodata=-9999.0)
    train, _ = build_datasets(experiment(root, task=task, nodata=7.0, flips=False))
    s = train[0]
    assert torch.all(s["image"][:, 0, :3] == 0) and torch.isfinite(s["image"]).all()
    assert s["image"][:, 0, 3].abs().sum() > 0
    if task == "regression":
        assert s["mask"].dtype == torch.float32
        assert torch.isnan(s["mask"][0, :3]).all() and not torch.isnan(s["mask"][1:]).any()
    else:
        assert (s["mask"][0, :3] == -1).all() and (s["mask"][1:] >= 0).all()


def test_label_file_nodata_is_ignored(tmp_path):
    root = make_tiles(tmp_path / "d")
    lab = read(root / "train" / "labels" / "tile0.tif")[0].astype("uint8")
    lab[2, 2] = 255
    write_tif(root / "train" / "labels" / "tile0.tif", lab, nodata=255)
    train, _ = build_datasets(experiment(root, flips=False))
    assert train[0]["mask"][2, 2] == -1


def test_flips_are_a_function_of_seed_epoch_index(tmp_path):
    root = make_tiles(tmp_path / "d", n_train=4)
    exp = experiment(root, flips=True)
    train, _ = build_datasets(exp)
    plain = GeoTiffDataset(train.samples, task=exp.task, mean=train.mean.ravel(), std=train.std.ravel())
    seen = set()
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(4):
            h, v = train.flips_for(i)
            seen.add((h, v))
            got, ref = train[i], plain[i]
            for key in ("image", "mask"):  # image and mask flip together
                expect = ref[key].numpy()
                expect = expect[..., ::-1] if h else expect
                expect = expect[..., ::-1, :] if v else expect
                np.testing.assert_array_equal(got[key].numpy(), expect)
    assert len(seen) >= 3  # flips actually vary with (epoch, index)
    # Same (seed, epoch, index) → same sample, whatever the global RNGs or process (pickled copy) say.
    train.set_epoch(1)
    before = [train[i]["image"] for i in range(4)]
    np.random.seed(123), torch.manual_seed(123)
    copy = pickle.loads(pickle.dumps(train))
    assert all(torch.equal(copy[i]["image"], before[i]) for i in range(4))
    other_seed = build_datasets(exp.model_copy(update={"run": exp.run.model_copy(update={"seed": 7})}))[0]
    other_seed.set_epoch(1)
    assert [other_seed.flips_for(i) for i in range(4)] != [train.flips_for(i) for i in range(4)]
    _, val = build_datasets(exp)
    assert all(val.flips_for(i) == (False, False) for i in range(len(val)))


def test_change_detection_stacks_dates(tmp_path):
    root = make_tiles(tmp_path / "d", task="change_detection")
    train, _ = build_datasets(experiment(root, task="change_detection", flips=False))
    s = train[0]
    assert s["image"].shape == (2, 3, 8, 8) and s["mask"].dtype == torch.int64
    t1 = read(root / "train" / "images" / "tile0_t1.tif")
    np.testing.assert_allclose(s["image"][1].numpy() * train.std + train.mean, t1, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Errors name the path and the fix


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}.*does not exist"):
        build_datasets(experiment(tmp_path / "nope"))


def test_glob_matching_nothing_names_glob_and_root(tmp_path):
    root = make_tiles(tmp_path / "d")
    with pytest.raises(DataError, match=rf"'train/imgs/\*.tif' under {root}"):
        build_datasets(experiment(root, train_images="train/imgs/*.tif"))


def test_band_index_beyond_count(tmp_path):
    root = make_tiles(tmp_path / "d")
    with pytest.raises(DataError, match=r"band mismatch.*band 4 but .*tile0.tif has 3 bands"):
        build_datasets(experiment(root, bands=[1, 4]))


def test_differing_band_counts(tmp_path):
    root = make_tiles(tmp_path / "d")
    write_tif(root / "train" / "images" / "tile1.tif", np.ones((4, 8, 8), "float32"))
    with pytest.raises(DataError, match=r"differing band counts: .*tile0.tif has 3 bands but .*tile1.tif has 4"):
        build_datasets(experiment(root))
    write_tif(root / "train" / "images" / "tile1.tif", np.ones((3, 8, 8), "float32"))
    write_tif(root / "val" / "images" / "tile0.tif", np.ones((4, 8, 8), "float32"))
    with pytest.raises(DataError, match=r"differing band counts: .*train/images/tile0.tif has 3 .*val/images/tile0.tif has 4"):
        build_datasets(experiment(root))


def test_corrupt_tile_is_named(tmp_path):
    root = make_tiles(tmp_path / "d")
    (root / "val" / "images" / "tile0.tif").write_bytes(b"II*\x00not really a tiff")
    with pytest.raises(DataError, match=r"cannot read tile .*val/images/tile0.tif"):
        build_datasets(experiment(root))


def test_image_label_shape_mismatch_names_both(tmp_path):
    root = make_tiles(tmp_path / "d")
    write_tif(root / "train" / "labels" / "tile1.tif", np.zeros((4, 4), "uint8"))
    with pytest.raises(DataError, match=r"shape mismatch: image .*images/tile1.tif is 8x8 but label .*labels/tile1.tif is 4x4"):
        build_datasets(experiment(root))


def test_label_values_out_of_range_name_file_and_values(tmp_path):
    root = make_tiles(tmp_path / "d")
    write_tif(root / "train" / "labels" / "tile0.tif", np.full((8, 8), 5, "uint8"))
    with pytest.raises(DataError, match=r"labels/tile0.tif has values \[5\] outside \[0, 2\)"):
        build_datasets(experiment(root))  # before step 1, not when the tile is first read


def test_unpaired_stems(tmp_path):
    root = make_tiles(tmp_path / "d")
    os.rename(root / "train" / "labels" / "tile1.tif", root / "train" / "labels" / "other.tif")
    with pytest.raises(DataError, match=r"do not pair up.*images/tile1.tif.*labels/other.tif"):
        build_datasets(experiment(root))


def test_change_detection_dates_must_be_coregistered(tmp_path):
    root = make_tiles(tmp_path / "d", task="change_detection")
    write_tif(root / "train" / "images" / "tile1_t1.tif", np.ones((3, 8, 8), "float32"), x0=500_010.0)
    with pytest.raises(DataError, match=r"not co-registered: .*tile1_t0.tif .* vs .*tile1_t1.tif"):
        build_datasets(experiment(root, task="change_detection"))


def test_change_detection_naming_rule(tmp_path):
    root = make_tiles(tmp_path / "d", task="change_detection")
    os.remove(root / "val" / "images" / "tile0_t1.tif")
    with pytest.raises(DataError, match=r"at least two dates"):
        build_datasets(experiment(root, task="change_detection"))
    write_tif(root / "val" / "images" / "tile0.tif", np.ones((3, 8, 8), "float32"))
    with pytest.raises(DataError, match=r"val/images/tile0.tif .* not named <tile>_t<k>.tif"):
        find_samples(root, "val/images/*.tif", "val/labels/*.tif", num_dates=2)


def test_change_detection_dates_must_match_task_num_dates(tmp_path):
    root = make_tiles(tmp_path / "d", task="change_detection")
    exp = experiment(root, task="change_detection")
    with pytest.raises(DataError, match=r"tiles have 2 dates .*tile0_t0.tif.* but the model is built for "
                                        r"task.num_dates=3: set task.num_dates=2"):
        build_datasets(exp.model_copy(update={"task": exp.task.model_copy(update={"num_dates": 3})}))
    for split, n in (("train", 2), ("val", 1)):  # a third date for every tile: now 3 dates it is
        for i in range(n):
            write_tif(root / split / "images" / f"tile{i}_t2.tif", np.ones((3, 8, 8), "float32"))
    train, _ = build_datasets(exp.model_copy(update={"task": exp.task.model_copy(update={"num_dates": 3})}))
    assert train[0]["image"].shape == (3, 3, 8, 8)
    with pytest.raises(DataError, match=r"tiles have 3 dates .* set task.num_dates=3"):
        build_datasets(exp)


# ---------------------------------------------------------------------------------------------------
# Stats


def test_stats_streaming_nodata_aware_atomic_idempotent(tmp_path):
    a = write_tif(tmp_path / "a.tif", np.array([[[1, 2], [3, -1]]], "float32"), nodata=-1)
    b = write_tif(tmp_path / "b.tif", np.array([[[5, np.nan], [7, 9]]], "float32"))
    stats = compute_stats([a, b])
    values = np.array([1, 2, 3, 5, 7, 9.0])
    assert stats.count == [6]
    np.testing.assert_allclose([stats.mean[0], stats.std[0]], [values.mean(), values.std()])
    calls = []
    out = load_or_compute_stats([a, b], tmp_path / "s" / "stats.json", barrier=lambda: calls.append(1))
    assert out.mean == stats.mean and calls == [1]
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["stats.json"]  # no temp file left behind
    # A non-main rank never computes: it waits at the barrier and reads what the main one wrote.
    again = load_or_compute_stats(["/does/not/exist.tif"], tmp_path / "s" / "stats.json", is_main=False,
                                  barrier=lambda: None)
    assert again == read_stats(tmp_path / "s" / "stats.json")


# ---------------------------------------------------------------------------------------------------
# Synthetic data


@pytest.mark.parametrize("task,n_dates", [("segmentation", 1), ("regression", 1), ("change_detection", 2),
                                          ("change_detection", 3)])
def test_synthetic_is_georeferenced_and_builds(tmp_path, task, n_dates):
    root = generate_synthetic(task, tmp_path / "syn", n_train=4, n_val=2, tile_size=16, num_bands=4, seed=1,
                              num_dates=n_dates)
    images = sorted((root / "train" / "images").glob("*.tif"))
    assert len(images) == 4 * n_dates and (root / "stats.json").is_file()
    origins = set()
    for p in images:
        with rasterio.open(p) as src:
            assert src.crs.to_epsg() == 32650 and src.res == (10.0, 10.0) and src.count == 4
            origins.add((src.transform.c, src.transform.f))
    assert len(origins) == 4  # one distinct offset per tile (dates of a tile share theirs)
    dates = {"num_dates": n_dates} if n_dates > 1 else {}
    exp = Experiment.model_validate({"task": {"name": task, "loss": "mse" if task == "regression" else "ce", **dates},
                                     "data": {"kind": "synthetic", "root": str(root), "synthetic": {
                                         "n_train": 4, "n_val": 2, "tile_size": 16, "num_bands": 4, "seed": 1}}})
    train, val = build_datasets(exp)
    assert len(train) == 4 and len(val) == 2
    assert train[0]["image"].shape == ((n_dates, 4, 16, 16) if n_dates > 1 else (4, 16, 16))
    bad = build_datasets  # the same folder with other parameters is refused, not silently reused
    with pytest.raises(DataError, match="other parameters"):
        bad(exp.model_copy(update={"data": exp.data.model_copy(update={"synthetic": exp.data.synthetic.model_copy(
            update={"seed": 2})})}))


def test_synthetic_generation_race_is_safe(tmp_path, monkeypatch):
    root = tmp_path / "syn"
    args = ("segmentation", root, 3, 1, 16, 6, 0)
    with ThreadPoolExecutor(2) as pool:  # two writers at once: one rename wins, both return the same data
        assert list(pool.map(lambda _: generate_synthetic(*args), range(2))) == [root, root]
    first = {p.name: p.read_bytes() for p in (root / "train" / "images").iterdir()}
    assert len(first) == 3 and [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temp dirs left

    # The loser's rename fails because the winner's folder landed in between: it keeps the winner's.
    other = tmp_path / "other"
    real_rename = os.rename

    def winner_lands_first(src, dst):
        real_rename(root, dst)
        real_rename(src, dst)

    monkeypatch.setattr(synthetic.os, "rename", winner_lands_first)
    generate_synthetic("segmentation", other, 3, 1, 16, 6, 0)
    assert {p.name: p.read_bytes() for p in (other / "train" / "images").iterdir()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_synthetic_refuses_nonempty_foreign_root(tmp_path):
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=f"{tmp_path / 'syn'} exists and is not empty"):
        generate_synthetic("segmentation", tmp_path / "syn", 2, 1, 16, 6, 0)


def _fit(task: str, tmp_path: Path, steps: int = 100, num_dates: int | None = None) -> float:
    """A per-pixel linear model (1x1 conv) trained briefly → val IoU of class 1, or R2.

    Losses and scores by hand (cross-entropy ignoring -1; MSE of the sigmoid over valid pixels, as the regression
    head bounds it) rather than the tasks' (tested in test_tasks.py): importing TerraTorch's tasks costs ~15 s.
    """
    dates = {"num_dates": num_dates} if num_dates else {}
    exp = Experiment.model_validate({"task": {"name": task, "loss": "mse" if task == "regression" else "ce", **dates},
                                     "data": {"root": str(tmp_path / f"{task}{num_dates or ''}"), "synthetic": {
                                         "n_train": 8, "n_val": 4, "tile_size": 32}}})
    train, val = build_datasets(exp)

    def batch(ds):
        xs = torch.stack([ds[i]["image"] for i in range(len(ds))])
        return xs.flatten(1, 2) if xs.dim() == 5 else xs, torch.stack([ds[i]["mask"] for i in range(len(ds))])

    (x, y), (vx, vy) = batch(train), batch(val)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(x.shape[1], 1 if task == "regression" else 2, 1)
    def out(inputs):
        raw = model(inputs)
        return torch.sigmoid(raw[:, 0]) if task == "regression" else raw

    def loss_fn(pred, target):
        if task != "regression":
            return torch.nn.functional.cross_entropy(pred, target, ignore_index=-1)
        ok = ~torch.isnan(target)
        return ((pred - torch.nan_to_num(target)) ** 2)[ok].mean()

    lr = 20.0 if task == "regression" else 1.0  # MSE through a sigmoid has small gradients
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on 2 shared cores, 2 threads run ~20x slower than 1
    try:
        for _ in range(steps):  # plain gradient descent: torch.optim's first use imports dynamo (~4 s)
            model.zero_grad()
            loss_fn(out(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        pred = out(vx)
    if task == "regression":
        ok = ~torch.isnan(vy)
        return float(1 - ((pred - vy)[ok] ** 2).sum() / ((vy[ok] - vy[ok].mean()) ** 2).sum())
    ok, hit, truth = vy != -1, pred.argmax(1) == 1, vy == 1
    return float((hit & truth & ok).sum() / ((hit | truth) & ok).sum())


def test_synthetic_is_learnable(tmp_path):
    # Chance: calling every pixel disturbed/changed scores the class fraction (about 0.17 and 0.12).
    assert _fit("segmentation", tmp_path) > 0.7
    assert _fit("change_detection", tmp_path) > 0.5
    assert _fit("change_detection", tmp_path, num_dates=3) > 0.5  # changes spread over the later dates
    assert _fit("regression", tmp_path) > 0.6  # predicting the mean scores 0


# ---------------------------------------------------------------------------------------------------
# TerraTorch datamodule


# rioxarray (TerraTorch's reader) still multiplies Affines with `*`; that noise is not ours to fix.
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_terratorch_datamodule_samples_are_normalized_and_deterministic(tmp_path):
    root = make_tiles(tmp_path / "tt", n_train=3)
    img = read(root / "train" / "images" / "tile0.tif")
    img[:, 0, 0] = -9999.0
    write_tif(root / "train" / "images" / "tile0.tif", img, nodata=-9999.0)
    means, stds = [10.0, 20.0, 30.0], [2.0, 4.0, 5.0]
    exp = Experiment.model_validate({"run": {"seed": 3}, "data": {"kind": "terratorch", "batch_size": 2, "terratorch": {
        "class_path": "terratorch.datamodules.GenericNonGeoSegmentationDataModule",
        "init_args": {"num_classes": 2, "train_data_root": str(root / "train" / "images"),
                      "train_label_data_root": str(root / "train" / "labels"),
                      "val_data_root": str(root / "val" / "images"), "val_label_data_root": str(root / "val" / "labels"),
                      "means": means, "stds": stds,
                      "train_transform": [{"class_path": "albumentations.HorizontalFlip", "init_args": {"p": 0.5}},
                                          {"class_path": "albumentations.pytorch.ToTensorV2"}]}}}})
    train, val = build_datasets(exp)
    m, s = np.array(means)[:, None, None], np.array(stds)[:, None, None]
    v = val[0]
    assert v["image"].dtype == torch.float32 and v["mask"].dtype == torch.int64 and v["image"].shape == (3, 8, 8)
    np.testing.assert_allclose(v["image"].numpy(), (read(root / "val" / "images" / "tile0.tif") - m) / s, rtol=1e-5)
    t = train[0]  # nodata pixel: image 0, label ignored
    assert torch.all(t["image"][:, 0, 0] == 0) and t["mask"][0, 0] == -1
    # Flips come from (seed, epoch, index): repeatable, and matching the unflipped normalized tile.
    raw = (read(root / "train" / "images" / "tile1.tif") - m) / s
    label = read(root / "train" / "labels" / "tile1.tif")[0]
    flips = set()
    for epoch in range(4):
        train.set_epoch(epoch)
        a = train[1]
        assert torch.equal(a["image"], pickle.loads(pickle.dumps(train))[1]["image"])
        flipped = np.allclose(a["image"].numpy(), raw[..., ::-1], rtol=1e-5)
        assert flipped or np.allclose(a["image"].numpy(), raw, rtol=1e-5)
        np.testing.assert_array_equal(a["mask"].numpy(), label[..., ::-1] if flipped else label)
        flips.add(flipped)
    assert flips == {True, False}


def test_stats_command_writes_and_recomputes(tmp_path):
    import json

    from trainer.data.synthetic import generate_synthetic

    root = tmp_path / "d"
    generate_synthetic("segmentation", root, n_train=4, n_val=2, tile_size=16, num_bands=3, seed=1)
    (root / "stats.json").unlink()
    r = run_python(["-m", "trainer", "stats", "--config", "launch/configs/demo.yaml", f"data.root={root}",
                    "data.kind=geotiff"], cwd=Path.cwd(), timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads((root / "stats.json").read_text())
    assert len(stats["mean"]) == 3 and all(s > 0 for s in stats["std"])
    r = run_python(["-m", "trainer", "stats", "--config", "launch/configs/demo.yaml",
                    f"data.root={tmp_path / 'missing'}"], cwd=Path.cwd(), timeout=120)
    assert r.returncode == 2 and str(tmp_path / "missing") in r.stderr
