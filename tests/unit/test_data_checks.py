"""Labels and tile headers checked before step 1 (trainer.data.checks): real GeoTIFFs in tmp_path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.io import DatasetReader
from rasterio.transform import Affine

from trainer.config import TaskConfig
from trainer.data import build_datasets
from trainer.data import checks
from trainer.data.checks import CACHE_NAME, check_labels
from trainer.data.geotiff import find_samples
from trainer.errors import DataError
from tests.unit.test_data import experiment, make_tiles, write_tif


def test_regression_label_out_of_range_found_before_training(tmp_path):
    root = make_tiles(tmp_path / "d", task="regression")
    write_tif(root / "val" / "labels" / "tile0.tif", np.full((8, 8), 200.0, "float32"))
    with pytest.raises(DataError, match=r"regression label tile .*val/labels/tile0.tif has values \[200.0\] outside"):
        build_datasets(experiment(root, "regression"))


def test_bad_label_under_image_nodata_is_not_an_error(tmp_path):
    # training ignores labels where the image is nodata (GeoTiffDataset._read_label): so does the check
    root = make_tiles(tmp_path / "d")
    image = np.full((3, 8, 8), 50.0, "float32")
    image[:, :2, :] = -9999.0
    write_tif(root / "train" / "images" / "tile0.tif", image, nodata=-9999.0)
    label = np.zeros((8, 8), "uint8")
    label[:2, :] = 7
    write_tif(root / "train" / "labels" / "tile0.tif", label)
    train, _ = build_datasets(experiment(root))
    assert int((train[0]["mask"] == -1).sum()) == 16  # (flips may move the rows)
    label[3, 3] = 7  # one bad pixel where the image is valid
    write_tif(root / "train" / "labels" / "tile0.tif", label)
    with pytest.raises(DataError, match=r"labels/tile0.tif has values \[7\] outside \[0, 2\)"):
        build_datasets(experiment(root))


def test_ignore_index_and_nodata_labels_pass_fractional_classes_do_not(tmp_path):
    root = make_tiles(tmp_path / "d")
    label = np.zeros((8, 8), "float32")
    label[0, 0], label[0, 1], label[0, 2] = -1, np.nan, 255  # ignore_index, NaN, file nodata
    write_tif(root / "train" / "labels" / "tile0.tif", label, nodata=255)
    build_datasets(experiment(root))
    label[5, 5] = 0.5
    write_tif(root / "train" / "labels" / "tile0.tif", label, nodata=255)
    with pytest.raises(DataError, match=r"tile0.tif has values \[0.5\] outside"):
        build_datasets(experiment(root))


def test_label_on_another_grid_names_both_files(tmp_path):
    root = make_tiles(tmp_path / "d")
    write_tif(root / "train" / "labels" / "tile1.tif", np.zeros((8, 8), "uint8"), x0=500_080.0)
    with pytest.raises(DataError, match=r"label .*labels/tile1.tif .* is not on the grid of its image "
                                        r".*images/tile1.tif"):
        build_datasets(experiment(root))
    write_tif(root / "train" / "labels" / "tile1.tif", np.zeros((8, 8), "uint8"), crs="EPSG:32651")
    with pytest.raises(DataError, match=r"not on the grid"):
        build_datasets(experiment(root))


def test_complex_tiles_are_refused(tmp_path):
    root = make_tiles(tmp_path / "d")
    write_tif(root / "train" / "labels" / "tile0.tif", np.zeros((8, 8), "complex64"))
    with pytest.raises(DataError, match=r"label tile .*tile0.tif is complex-valued"):
        build_datasets(experiment(root))


def test_big_label_is_read_in_chunks_and_last_chunk_checked(tmp_path, monkeypatch):
    size = 512
    img, lab = tmp_path / "d" / "train" / "images" / "big.tif", tmp_path / "d" / "train" / "labels" / "big.tif"
    img.parent.mkdir(parents=True), lab.parent.mkdir(parents=True)
    label = np.zeros((size, size), "uint8")
    label[-1, -1] = 9
    profile = dict(driver="GTiff", height=size, width=size, count=1, crs="EPSG:32650",
                   transform=Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0), tiled=True, blockxsize=128, blockysize=128)
    with rasterio.open(img, "w", dtype="float32", **profile) as dst:
        dst.write(np.ones((1, size, size), "float32"))
    with rasterio.open(lab, "w", dtype="uint8", **profile) as dst:
        dst.write(label[None])
    areas = []
    read = DatasetReader.read

    def spy(self, *args, **kwargs):
        out = read(self, *args, **kwargs)
        areas.append(out.shape[-1] * out.shape[-2])
        return out

    monkeypatch.setattr(DatasetReader, "read", spy)
    monkeypatch.setattr(checks, "CHUNK_PIXELS", size * 128)  # as a 4 Mpx budget would treat a 32k-wide tile
    samples = find_samples(tmp_path / "d", "train/images/*.tif", "train/labels/*.tif")
    with pytest.raises(DataError, match=r"big.tif has values \[9\]"):
        check_labels(samples, TaskConfig())
    # 4 label chunks of 128 rows (never the whole tile at once), then the image window of the suspect chunk only
    assert len(areas) == 5 and max(areas) == size * 128


def test_checked_labels_are_remembered_until_they_change(tmp_path):
    root = make_tiles(tmp_path / "d", n_train=3)
    samples = find_samples(root, "train/images/*.tif", "train/labels/*.tif")
    task = TaskConfig()
    assert check_labels(samples, task, cache_dir=root) == 3
    assert (root / CACHE_NAME).is_file()
    assert check_labels(samples, task, cache_dir=root) == 0  # a resumed run pays a stat() per file
    st = os.stat(samples[1].label)
    os.utime(samples[1].label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert check_labels(samples, task, cache_dir=root) == 1
    assert check_labels(samples, TaskConfig(num_classes=3), cache_dir=root) == 3  # other task settings: again
    write_tif(Path(samples[0].label), np.full((8, 8), 5, "uint8"))  # changed after a good check: found
    with pytest.raises(DataError, match=r"tile0.tif has values \[5\]"):
        check_labels(samples, TaskConfig(num_classes=3), cache_dir=root)
