"""The experiment matrix (backbone x task configs) and each task end to end on CPU.

- The backbone x task matrix is complete; each matrix file's header gives the one-line tiny CPU command and
  names its real-size memory profile.
- Every matrix config trains 2 steps in the tiny variant its header documents, through `launch/train.py`,
  and exports. All runs share one interpreter (`runpy` of the launcher script per run): TerraTorch's import
  (15-30 s here) is paid once instead of twelve times.
- Regression trains and is scored on the same bounded output: with MSE, val loss == RMSE^2.
- Multi-temporal change detection: 3 dates fused by concatenation and by Prithvi's native frames train the
  same way (`task.num_dates=3`), on synthetic tiles with 3 dates.
- `launch/predict.py` runs on the trained Prithvi jobs (one of them 3 dates) and a LoRA job over scenes
  mosaicked from several val tiles; the outputs keep the input's georeferencing.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.merge import merge

from tests.integration.helpers import ROOT, run_python
from trainer.config import load_experiment

CONFIG_DIR = ROOT / "launch" / "configs"
TINY_OVERRIDE = {"prithvi": "model.backbone=prithvi_eo_tiny", "terramind": "model.backbone=terramind_v1_tiny",
                 "earthmind": "model.backbone_kwargs.tiny=true", "internvl2_26b": "model.backbone_kwargs.tiny=true",
                 "internvl2_40b": "model.backbone_kwargs.tiny=true"}
TASK_NAME = {"forest": "segmentation", "insar": "regression", "change": "change_detection"}
MATRIX = [f"{b}_{t}" for b in TINY_OVERRIDE for t in TASK_NAME]
# Extra runs: (config, overrides, data set) -- 3-date change detection, both ways of fusing the dates.
TEMPORAL = {"prithvi_change_t3_concat": ("prithvi_change", ["task.num_dates=3", "task.fusion=concat"], "change3"),
            "prithvi_change_t3_native": ("prithvi_change", ["task.num_dates=3", "task.fusion=native"], "change3")}
RUNS = {**{name: (name, [], name.rsplit("_", 1)[1]) for name in MATRIX}, **TEMPORAL}
# as the TerraTorch tasks log them (SemanticSegmentationTask, PixelwiseRegressionTask; change: the change class)
VAL_METRICS = {"segmentation": ["mIoU", "F1_Score", "Pixel_Accuracy", "IoU_1"],
               "regression": ["RMSE", "MAE", "R2_Score"], "change_detection": ["F1_Score", "IoU", "Precision", "Recall"]}
# Shrinks every run to two steps on 32 px tiles; n_val equals the batch so validation is one batch.
FAST = ["data.synthetic.n_train=8", "data.synthetic.n_val=8", "data.synthetic.tile_size=32", "data.batch_size=8",
        "run.max_steps=2", "run.eval_every=2", "run.checkpoint_every=2", "run.log_every=1", "run.progress=false",
        "scheduler.warmup_steps=0"]
SIZE = {"prithvi": ["model.backbone_kwargs.img_size=32"], "terramind": [],
        # The towers would resize 32 px tiles to 224: keep them at 32 for speed. internvl2_26b's profile
        # (zero3_offload_lora) needs DeepSpeed, which cannot share this interpreter with the other runs; that
        # profile trains in test_profiles_train.py, here the same LoRA path runs without ZeRO.
        "earthmind": ["model.backbone_kwargs.image_size=32"],
        "internvl2_26b": ["model.backbone_kwargs.image_size=32", "memory.profile=lora"],
        "internvl2_40b": ["model.backbone_kwargs.image_size=32"]}  # its own profile, qlora: no DeepSpeed
# Jobs predicted after training, with extra predict options. earthmind_change trained with LoRA: its export (plain
# model + peft adapters) is rebuilt with the adapters.
PREDICT = {"prithvi_forest": [], "prithvi_insar": [], "prithvi_change": ["--probabilities"], "earthmind_change": [],
           "prithvi_change_t3_native": []}
# launch/*.py run one after another in this interpreter; prints their exit codes as JSON.
DRIVER = """
import json, runpy, sys
codes = []
for name, script, args in json.loads(sys.argv[1]):
    print(f"=== RUN {name}", file=sys.stderr, flush=True)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code if isinstance(e.code, int) else int(e.code is not None))
print(json.dumps(codes))
"""


def header(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


def documented_tiny_command(name: str) -> list[str]:
    """The overrides of the header's `python launch/train.py --config ... <overrides>` line."""
    line = next(line for line in header(CONFIG_DIR / f"{name}.yaml").splitlines() if "launch/train.py" in line)
    words = shlex.split(line.lstrip("# "))
    return words[words.index("--config") + 2:]


def test_matrix_is_complete():
    # (that every shipped experiment loads is tests/unit/test_config.py's job)
    assert set(MATRIX) <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}, "the backbone x task matrix is incomplete"


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_header_documents_tiny_run_and_profile(name):
    exp = load_experiment(CONFIG_DIR / f"{name}.yaml")
    backbone, task = name.rsplit("_", 1)
    assert exp.task.name == TASK_NAME[task] and exp.name == name
    text = header(CONFIG_DIR / f"{name}.yaml")
    assert f"python launch/train.py --config launch/configs/{name}.yaml {TINY_OVERRIDE[backbone]}\n" in text
    assert f"memory.profile: {exp.memory.profile}" in text, "the header must name the real-size profile"


def _scene(files: list[Path], out: Path) -> Path:
    merge([str(f) for f in files], dst_path=str(out))
    return out


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory):
    from trainer.data import generate_synthetic

    tmp = tmp_path_factory.mktemp("matrix")
    runs, scenes = [], {}
    for name, (config, extra, data) in RUNS.items():
        backbone = config.rsplit("_", 1)[0]
        overrides = [*documented_tiny_command(config), *SIZE[backbone], *FAST, *extra, f"data.root={tmp / 'data' / data}",
                     f"checkpoint.dir={tmp / name}"]
        if name == "prithvi_insar":
            overrides.append("task.loss=mse")  # val loss must then equal RMSE^2
        exp = load_experiment(CONFIG_DIR / f"{config}.yaml", overrides)
        if data not in scenes:  # the data the runs will find, and scenes mosaicked from its 8 val tiles
            s = exp.data.synthetic
            root = generate_synthetic(exp.task.name, exp.data.root, s.n_train, s.n_val, s.tile_size, s.num_bands, s.seed,
                                      num_dates=exp.task.dates)
            images = root / "val" / "images"
            dates = [f"_t{t}" for t in range(exp.task.dates)] if exp.task.dates > 1 else [""]
            scenes[data] = [_scene(sorted(images.glob(f"*{d}.tif")), tmp / f"scene_{data}{d}.tif") for d in dates]
        runs.append([name, str(ROOT / "launch/train.py"), ["--config", str(CONFIG_DIR / f"{config}.yaml"), *overrides]])
    for job in PREDICT:
        first, *later = scenes[RUNS[job][2]]
        inputs = ["--input", str(first)] + [arg for date in later for arg in ("--input2", str(date))]
        runs.append([f"predict_{job}", str(ROOT / "launch/predict.py"),
                     ["--job", str(tmp / job), *inputs, "--out", str(tmp / "pred" / f"{job}.tif"), "--tile", "32",
                      "--overlap", "8", *PREDICT[job]]])
    driver = tmp / "driver.py"  # one process for all runs, forked warm (helpers.run_python): imports paid once
    driver.write_text(DRIVER)
    r = run_python([driver, json.dumps(runs)], timeout=1800)
    logs = dict(part.split("\n", 1) for part in r.stderr.split("=== RUN ")[1:] if "\n" in part)
    assert r.returncode == 0, f"driver exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-8000:]}"
    codes = dict(zip([run[0] for run in runs], json.loads(r.stdout.strip().splitlines()[-1])))
    return {"tmp": tmp, "codes": codes, "logs": logs, "scenes": scenes}


def _ok(runs, name: str) -> None:
    assert runs["codes"][name] == 0, f"{name}: exit {runs['codes'][name]}\n{runs['logs'].get(name, '')[-6000:]}"


def _records(job: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_tiny_variant_trains_two_steps_and_exports(matrix_runs, name):
    _ok(matrix_runs, name)
    job = matrix_runs["tmp"] / name
    exp = load_experiment(job / "config.yaml")
    if name in TEMPORAL:  # the frozen config keeps the dates and the fusion the run trained with
        assert (exp.task.dates, exp.task.fusion) == (3, TEMPORAL[name][1][1].split("=")[1])
    assert [r["step"] for r in _records(job, "train")] == [1, 2]
    val = _records(job, "val")[-1]
    assert val["step"] == 2
    for key in ["loss", *VAL_METRICS[exp.task.name]]:
        assert math.isfinite(val[key]), (key, val)
    exported = {p.name for p in (job / "export").iterdir()}
    assert {"model.safetensors", "config.yaml", "stats.json"} <= exported, exported
    if exp.memory.profile == "lora":  # adapters + the rest; the merged copy only on request (export --merge)
        assert {"adapter", "export.json"} <= exported and "model.merged.safetensors" not in exported


@pytest.mark.slow
def test_regression_loss_and_metrics_see_the_same_bounded_output(matrix_runs):
    _ok(matrix_runs, "prithvi_insar")
    val = _records(matrix_runs["tmp"] / "prithvi_insar", "val")[-1]
    # One val batch, MSE loss: the loss the model trains on is the metrics' error squared only if both see
    # the sigmoid-bounded coherence (a loss on raw logits differs by a factor of 2-5 here).
    assert val["loss"] == pytest.approx(val["RMSE"] ** 2, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("job", list(PREDICT))
def test_predict_cli_on_trained_job_keeps_georeferencing(matrix_runs, job):
    _ok(matrix_runs, job)
    _ok(matrix_runs, f"predict_{job}")
    task = RUNS[job][2]
    out = matrix_runs["tmp"] / "pred" / f"{job}.tif"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with rasterio.open(matrix_runs["scenes"][task][0]) as src, rasterio.open(out) as pred:
        assert (pred.crs, pred.transform, pred.shape) == (src.crs, src.transform, src.shape)
        assert src.width >= 8 * 32  # several tiles: the windows really slide
        values = pred.read()
    if "--probabilities" in PREDICT[job]:
        assert values.shape[0] == 2 and values.dtype == np.float32
        np.testing.assert_allclose(np.nansum(values, axis=0)[~np.isnan(values[0])], 1.0, atol=1e-5)
    elif task == "insar":
        ok = values[~np.isnan(values)]
        assert values.dtype == np.float32 and ok.size and ok.min() >= 0 and ok.max() <= 1
    else:
        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 255}


def test_insar_targets_outside_the_unit_interval_are_refused(tmp_path):
    """The output is sigmoid-bounded: coherence stored as 0-255 could never be fitted, so it is an error."""
    from trainer.config import Experiment
    from trainer.data import build_datasets, generate_synthetic
    from trainer.errors import DataError

    root = generate_synthetic("regression", tmp_path / "insar", 2, 1, 16, 4)
    label = root / "train" / "labels" / "tile_0000.tif"
    with rasterio.open(label) as src:
        coherence, profile = src.read(), src.profile
    with rasterio.open(label, "w", **profile) as dst:
        dst.write(coherence * 255)  # NaN (masked) pixels stay NaN and stay allowed
    exp = Experiment.model_validate({"task": {"name": "regression", "loss": "mse"},
                                     "data": {"kind": "geotiff", "root": str(root)}})
    # found before step 1, when the datasets are built (trainer.data.checks), not when the tile is first read
    with pytest.raises(DataError, match=r"labels/tile_0000.tif has values .* outside \[0, 1\]"):
        build_datasets(exp)
    label.unlink()  # without the bad tile the in-range one trains as before
    (root / "train" / "images" / "tile_0000.tif").unlink()
    train, _ = build_datasets(exp)
    assert len(train) == 1 and not np.isnan(train[0]["mask"]).all()
