"""`launch/predict.py` on a job trained from a `terratorch fit` file (trainer.predict.terratorch_predict).

A tiny TerraTorch-format job (tt_configs) trains a few steps through launch/train.py and exports; predict then
writes a scene. The reference is TerraTorch's own predict path: the job's datamodule (its `predict_data_root`
pointed at the window, written as a file) gives the sample through its dataset and `on_after_batch_transfer`
under a predicting Trainer state; the task's model with the exported weights runs on it. Where one window covers a
pixel, predict's output is that forward (probabilities assert_close, class ids equal, regression values close).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import from_origin
from rasterio.windows import Window

from tests.integration import tt_configs as C
from tests.integration.helpers import ROOT, check, run_python, run_train

NODATA = -9999.0
CRS = "EPSG:32650"
TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


SEG = "encdec_prithvi_ce_weights"


@pytest.fixture(scope="module", params=[(SEG, "full"), ("prithvi_factory_rmse", "full"), (SEG, "lora")],
                ids=lambda p: "-".join(p))
def job(request, tmp_path_factory):
    name, profile = request.param
    kind = C.configs()[name][0]
    base = tmp_path_factory.mktemp(f"ttpredict_{kind}_{profile}")
    root = C.write_tiles(base / "data", kind)
    config = C.write_config(base, name, root)
    job_dir = base / "job"
    check(run_train([f"memory.profile={profile}", "trainer.max_steps=3", f"checkpoint.dir={job_dir}",
                     "run.progress=false"], config=config, timeout=900))
    assert (job_dir / "export" / "model.safetensors").is_file()
    return kind, job_dir, base


def write_scene(path: Path, height: int, width: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(1000, 300, (6, height, width)).astype(np.float32)
    img[:, 5, 6] = NODATA  # a nodata pixel in every band, one in a single band
    img[2, 20, 3] = NODATA
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=6, dtype="float32", crs=CRS,
                       transform=TRANSFORM, nodata=NODATA) as f:
        f.write(img)
    return img


def crop(scene: Path, out: Path, row: int, col: int, size: int) -> Path:
    with rasterio.open(scene) as src:
        arr = src.read(window=Window(col, row, size, size))
        profile = dict(src.profile, height=size, width=size, transform=src.window_transform(Window(col, row, size,
                                                                                                     size)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as f:
        f.write(arr)
    return out


def trained_weights(job_dir: Path, model: torch.nn.Module, exp) -> torch.nn.Module:
    """The export's weights (full profiles); LoRA: the profile applied as training applies it and the last
    checkpoint's trained tensors over the frozen base of the same seeded build (checkpoints drop frozen weights), not
    the export/inference code path."""
    from safetensors.torch import load_file

    from trainer.memory.profiles import resolve_profile
    from trainer.model.fitting import apply_profile
    from trainer.model.terratorch_task import backbone_path

    profile = resolve_profile(exp.memory)
    if profile.lora is None:
        model.load_state_dict(load_file(str(job_dir / "export" / "model.safetensors")))
        return model
    model = apply_profile(model, profile, torch.float32, 0, encoder_path=backbone_path(model))
    last = sorted((job_dir / "checkpoints").glob("step-*"))[-1]
    state = load_file(str(last / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not result.unexpected_keys and not set(result.missing_keys) & trainable
    assert any("lora_" in k for k in state)
    return model


def terratorch_forward(job_dir: Path, window_file: Path) -> torch.Tensor:
    """The task model's output on `window_file` as TerraTorch's predict path prepares it."""
    from lightning.pytorch import Trainer

    from trainer.config import load_experiment
    from trainer.model.terratorch_task import instantiate

    exp = load_experiment(job_dir / "export" / "config.yaml")
    spec = copy.deepcopy(exp.terratorch)
    init = spec.config["data"]["init_args"]
    init["predict_data_root"] = str(window_file.parent)
    built = instantiate(spec, exp.run.seed)
    dm = built.datamodule
    model = trained_weights(job_dir, built.task.model, exp).eval()
    dm.setup("predict")
    assert len(dm.predict_dataset) == 1
    sample = dm.predict_dataset[0]
    batch = {"image": sample["image"][None]}
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.predicting = True
    dm.trainer = trainer
    batch = dm.on_after_batch_transfer(batch, 0)
    with torch.no_grad():
        return model(batch["image"]).output[0].float()


def predict(job_dir: Path, scene: Path, out: Path, *extra: str, quicklook: bool = False):
    return run_python([ROOT / "launch/predict.py", "--job", job_dir, "--input", scene, "--out", out, "--tile", "32",
                       *([] if quicklook else ["--no-quicklook"]), *extra])


def test_predict_one_window_is_the_task_models_forward(job, tmp_path):
    kind, job_dir, _ = job
    scene = tmp_path / "scene.tif"
    write_scene(scene, 32, 32)
    win = crop(scene, tmp_path / "win" / "window_img.tif", 0, 0, 32)
    out = tmp_path / "pred.tif"
    check(predict(job_dir, scene, out, *(["--probabilities"] if kind == "segmentation" else [])))
    ref = terratorch_forward(job_dir, win)
    with rasterio.open(out) as dst, rasterio.open(scene) as src:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        got = torch.from_numpy(dst.read())
    valid = torch.ones(32, 32, dtype=torch.bool)
    valid[5, 6] = valid[20, 3] = False
    if kind == "segmentation":
        want = ref.softmax(dim=0)
    else:
        want = ref if ref.dim() == 3 else ref[None]
    assert got.shape == want.shape
    assert torch.isnan(got[:, ~valid]).all()  # invalid in any band: nodata
    torch.testing.assert_close(got[:, valid], want[:, valid], rtol=1e-4, atol=1e-5)
    assert float(want[:, valid].std()) > 0  # not a constant map


def test_predict_scene_keeps_grid_and_single_window_pixels(job, tmp_path):
    kind, job_dir, _ = job
    scene = tmp_path / "scene.tif"
    write_scene(scene, 48, 40)
    out = tmp_path / "pred.tif"
    r = check(predict(job_dir, scene, out, "--overlap", "8", quicklook=True))
    assert "4 windows" in r.stdout and out.with_suffix(".png").stat().st_size > 0
    ref = terratorch_forward(job_dir, crop(scene, tmp_path / "win" / "window_img.tif", 0, 0, 32))
    with rasterio.open(out) as dst, rasterio.open(scene) as src:
        assert (dst.crs, dst.transform, dst.shape, dst.count) == (src.crs, src.transform, (48, 40), 1)
        got = dst.read(1)
        assert dst.dtypes[0] == ("uint8" if kind == "segmentation" else "float32")
        assert dst.descriptions == (("class",) if kind == "segmentation" else ("value",))
    # windows start at rows 0/16 and cols 0/8: pixels above row 16 and left of col 8 see the first window only
    if kind == "segmentation":
        assert got[5, 6] == 255 and got[20, 3] == 255
        want = ref.argmax(dim=0).numpy()
        region = np.ones((16, 8), bool)
        region[5, 6] = False
        assert (got[:16, :8][region] == want[:16, :8][region]).all()
        assert set(np.unique(got)) <= {0, 1, 255}
    else:
        assert np.isnan(got[5, 6]) and np.isnan(got[20, 3])
        want = (ref if ref.dim() == 2 else ref[0]).numpy()
        region = np.ones((16, 8), bool)
        region[5, 6] = False
        np.testing.assert_allclose(got[:16, :8][region], want[:16, :8][region], rtol=1e-4, atol=1e-5)
        assert np.isfinite(got[~np.isnan(got)]).all() and np.isnan(got).sum() == 2


@pytest.mark.parametrize("job", [(SEG, "full")], indirect=True, ids=["full"])
def test_predict_refuses_what_it_cannot_reproduce(job, tmp_path):
    """A multimodal datamodule and --precision nf4: exit 2 naming the key, nothing written."""
    import shutil

    _, job_dir, _ = job
    export = tmp_path / "export"
    shutil.copytree(job_dir / "export", export)
    cfg = yaml.safe_load((export / "config.yaml").read_text())
    cfg["terratorch"]["config"]["data"]["class_path"] = "terratorch.datamodules.GenericMultiModalDataModule"
    (export / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    scene = tmp_path / "scene.tif"
    write_scene(scene, 32, 32)
    out = tmp_path / "pred.tif"
    r = predict(export, scene, out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "data.class_path" in r.stderr and "one input per modality" in r.stderr
    r = predict(job_dir, scene, out, "--precision", "nf4")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--precision nf4" in r.stderr and "fp32" in r.stderr
    four = tmp_path / "four_bands.tif"
    with rasterio.open(scene) as src:
        profile = dict(src.profile, count=4)
        data = src.read()[:4]
    with rasterio.open(four, "w", **profile) as f:
        f.write(data)
    r = predict(job_dir, four, out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "wrong band count" in r.stderr and str(four) in r.stderr and "6-band" in r.stderr
    assert not out.exists()
