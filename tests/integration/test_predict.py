"""Sliding-window prediction (trainer/predict/predict.py, `launch/predict.py`) with tiny untrained models, in process.

A job export is made by hand for each task (the matrix config with its tiny override, random weights,
config.yaml, stats.json). Scenes are several tiles large and not a multiple of the tile. Checked: the output's
georeferencing equals the input's; where one window alone covers a pixel the stitched output equals that
window's own inference (done here independently: rasterio read, normalize, forward); blended pixels lie
between the outputs of the windows covering them; output rows are written strip by strip; bad input is a
DataError naming the file (exit 2 from the CLI) and leaves nothing behind.
"""
from __future__ import annotations


import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

from tests.integration.helpers import ROOT, run_python
from trainer.config import dump_experiment, load_experiment
from trainer.data.stats import BandStats, write_stats
from trainer.errors import DataError

TILE, OVERLAP = 32, 8
H, W = 100, 150  # 4 x 6 windows, neither side a multiple of the stride
CRS = "EPSG:32650"
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 620_000.0)
TASKS = {"forest": ("segmentation", 6), "insar": ("regression", 4), "change": ("change_detection", 6)}


def make_export(root, task: str):
    """A job export as `export_job` writes it: config.yaml, model.safetensors, stats.json."""
    from trainer.model.models import build_model
    from trainer.train.export import save_safetensors

    # The config's tiny variant; a narrower decoder keeps the 3 x 24 reference forwards cheap.
    exp = load_experiment(ROOT / f"launch/configs/prithvi_{task}.yaml",
                          ["model.backbone=prithvi_eo_tiny", f"model.backbone_kwargs.img_size={TILE}",
                           "model.decoder_kwargs.channels=[32,16,8,8]"])
    torch.manual_seed(0)
    model = build_model(exp)
    export = root / f"job_{task}" / "export"
    export.mkdir(parents=True)
    save_safetensors(model.state_dict(), export / "model.safetensors")
    (export / "config.yaml").write_text(dump_experiment(exp))
    n = TASKS[task][1]
    mean, std = (np.linspace(-12, -16, n), np.full(n, 3.0)) if task == "insar" else (np.linspace(800, 2500, n),
                                                                                     np.linspace(200, 700, n))
    write_stats(export / "stats.json", BandStats(mean.tolist(), std.tolist(), [1] * n, 1))
    return export.parent, exp, model.eval(), mean.astype("float32"), std.astype("float32")


def write_scene(path, bands: int, seed: int, sar: bool = False, crs=CRS, transform=TRANSFORM, shape=(H, W)):
    rng = np.random.default_rng(seed)
    if sar:
        data, nodata = rng.normal(-14, 3, (bands, *shape)).astype("float32"), -9999.0
    else:
        data, nodata = rng.integers(300, 3000, (bands, *shape)).astype("uint16"), 0
    data[:, :6, :9] = nodata  # a corner of nodata
    with rasterio.open(path, "w", driver="GTiff", height=shape[0], width=shape[1], count=bands, dtype=data.dtype,
                       crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {t: make_export(root, t) for t in TASKS}


def scenes_for(tmp_path, task: str) -> list:
    n = TASKS[task][1]
    if task == "change":
        return [write_scene(tmp_path / f"t{d}.tif", n, seed=d) for d in (0, 1)]
    return [write_scene(tmp_path / "scene.tif", n, seed=0, sar=task == "insar")]


def starts(n: int) -> list[int]:
    return sorted(set(range(0, n - TILE, TILE - OVERLAP)) | {n - TILE})


def window_outputs(exp, model, mean, std, scenes) -> dict[tuple[int, int], np.ndarray]:
    """Each window inferred on its own, straight from the files (one batch: windows do not interact)."""
    keys, xs = [], []
    for r in starts(H):
        for c in starts(W):
            dates = []
            for path in scenes:
                with rasterio.open(path) as src:
                    x = src.read(window=Window(c, r, TILE, TILE), out_dtype="float32")
                    bad = (x == np.float32(src.nodata)).any(0)
                x = (x - mean[:, None, None]) / std[:, None, None]
                x[:, bad] = 0
                dates.append(x)
            keys.append((r, c))
            xs.append(np.stack(dates))
    x = torch.from_numpy(np.stack(xs))
    with torch.no_grad():
        y = model(x if exp.task.name == "change_detection" else x[:, 0]).output
    y = y[:, None] if exp.task.name == "regression" else y.softmax(1)  # regression: the head ends in a sigmoid
    return dict(zip(keys, y.numpy()))


@pytest.mark.parametrize("task", list(TASKS))
def test_stitched_equals_window_inference_and_keeps_georeferencing(tmp_path, exports, task):
    from trainer.predict.predict import predict_scene

    job, exp, model, mean, std = exports[task]
    scenes = scenes_for(tmp_path, task)
    result = predict_scene(job, scenes, tmp_path / "out.tif", tile=TILE, overlap=OVERLAP, batch_size=4,
                           probabilities=True, quicklook=tmp_path / "look.png")
    assert result.windows == len(starts(H)) * len(starts(W)) == 24
    with rasterio.open(scenes[0]) as src, rasterio.open(result.out) as out:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        stitched = out.read()
    assert stitched.shape[0] == (1 if task == "insar" else 2) and stitched.dtype == np.float32
    bad = np.zeros((H, W), bool)
    bad[:6, :9] = True
    assert np.isnan(stitched[:, bad]).all() and not np.isnan(stitched[:, ~bad]).any()

    outs = window_outputs(exp, model, mean, std, scenes)
    cover = np.zeros((H, W), int)
    for r, c in outs:
        cover[r:r + TILE, c:c + TILE] += 1
    lo, hi = np.full(stitched.shape, np.inf, "float32"), np.full(stitched.shape, -np.inf, "float32")
    for (r, c), y in outs.items():
        alone = (cover[r:r + TILE, c:c + TILE] == 1) & ~bad[r:r + TILE, c:c + TILE]
        assert alone.any(), f"window {(r, c)} has no pixel of its own: overlap too large for the test"
        np.testing.assert_allclose(stitched[:, r:r + TILE, c:c + TILE][:, alone], y[:, alone], atol=2e-5)
        lo[:, r:r + TILE, c:c + TILE] = np.minimum(lo[:, r:r + TILE, c:c + TILE], y)
        hi[:, r:r + TILE, c:c + TILE] = np.maximum(hi[:, r:r + TILE, c:c + TILE], y)
    seams = (cover > 1) & ~bad
    assert (stitched[:, seams] >= lo[:, seams] - 2e-5).all() and (stitched[:, seams] <= hi[:, seams] + 2e-5).all()
    assert result.quicklook.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_map_is_argmax_with_nodata_and_written_in_strips(tmp_path, exports, monkeypatch):
    import trainer.predict.predict as predict

    job = exports["forest"][0]
    scene = scenes_for(tmp_path, "forest")
    probs = predict.predict_scene(job, scene, tmp_path / "p.tif", tile=TILE, overlap=OVERLAP, probabilities=True,
                                  quicklook=None).out
    strips = []
    write_rows = predict._write_rows
    monkeypatch.setattr(predict, "_write_rows", lambda dst, acc, wsum, bad, top, n, mode: (
        strips.append((top, n)), write_rows(dst, acc, wsum, bad, top, n, mode)))
    classes = predict.predict_scene(job, scene, tmp_path / "c.tif", tile=TILE, overlap=OVERLAP, quicklook=None).out
    # Rows go out strip by strip as windows move down, each at most a tile high, covering the scene once.
    assert len(strips) == len(starts(H)) and all(n <= TILE for _, n in strips)
    assert [t for t, _ in strips] == [0] + list(np.cumsum([n for _, n in strips])[:-1])
    assert sum(n for _, n in strips) == H
    with rasterio.open(probs) as p, rasterio.open(classes) as c:
        prob, cls = p.read(), c.read(1)
        assert c.dtypes == ("uint8",) and c.nodata == 255
    valid = ~np.isnan(prob[0])
    np.testing.assert_array_equal(cls[valid], prob[:, valid].argmax(0))
    assert (cls[~valid] == 255).all() and (~valid).sum() == 6 * 9


def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, exports):
    from trainer.predict.predict import predict_scene

    job = exports["change"][0]
    t0 = write_scene(tmp_path / "t0.tif", 6, seed=0)
    cases = [  # (message, inputs): the last input is the bad one
        ("wrong band count", [t0, write_scene(tmp_path / "five.tif", 5, seed=1)]),
        ("not co-registered", [t0, write_scene(tmp_path / "shifted.tif", 6, 1, transform=TRANSFORM @ Affine.translation(3, 0))]),
        ("not co-registered", [t0, write_scene(tmp_path / "utm49.tif", 6, 1, crs="EPSG:32649")]),
        ("not co-registered", [t0, write_scene(tmp_path / "small.tif", 6, 1, shape=(H, W - 1))]),
        ("not georeferenced", [t0, write_scene(tmp_path / "nogeo.tif", 6, 1, crs=None, transform=Affine.identity())]),
        ("cannot read", [t0, tmp_path / "broken.tif"]),
        ("takes 2 dates", [t0]),
    ]
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 this is not a GeoTIFF")
    out = tmp_path / "out" / "pred.tif"
    for expected, inputs in cases:
        with pytest.raises(DataError, match=expected) as err:
            predict_scene(job, inputs, out, tile=TILE, overlap=OVERLAP, quicklook=out.with_suffix(".png"))
        if expected != "takes 2 dates":
            assert str(inputs[-1]) in str(err.value)
    with pytest.raises(DataError, match="no exported model"):
        predict_scene(tmp_path / "nojob", [t0], out)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_failure_while_writing_leaves_no_output(tmp_path, exports, monkeypatch):
    import trainer.predict.predict as predict

    calls = []

    def failing_run(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure half-way through the scene")
        return real_run(*args)

    real_run = predict._run
    monkeypatch.setattr(predict, "_run", failing_run)
    with pytest.raises(RuntimeError, match="half-way"):
        predict.predict_scene(exports["forest"][0], scenes_for(tmp_path, "forest"), tmp_path / "out" / "p.tif",
                              tile=TILE, overlap=OVERLAP, quicklook=tmp_path / "out" / "p.png")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_exits_2_on_bad_input(tmp_path, exports, capsys):
    from trainer.cli import main

    job = exports["forest"][0]
    nogeo = write_scene(tmp_path / "nogeo.tif", 6, 0, crs=None, transform=Affine.identity())
    assert main(["predict", "--job", str(job), "--input", str(nogeo), "--out", str(tmp_path / "p.tif")]) == 2
    err = capsys.readouterr().err
    assert "not georeferenced" in err and str(nogeo) in err and "Traceback" not in err
    assert main(["predict", "--job", str(job), "--input", str(nogeo), "--out", str(tmp_path / "p.tif"),
                 "--tile", "32", "--overlap", "20"]) == 2
    assert "--overlap" in capsys.readouterr().err
    # The launcher itself: same parser and exit code, no model is built before the input is checked.
    five = write_scene(tmp_path / "five.tif", 5, 0)
    r = run_python([ROOT / "launch/predict.py", "--job", job, "--input", five, "--out", tmp_path / "p.tif"],
                   timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "wrong band count" in r.stderr and str(five) in r.stderr
    assert not (tmp_path / "p.tif").exists()
