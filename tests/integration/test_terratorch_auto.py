"""`memory.profile: auto` on a `terratorch fit` file, through the real entry points: `launch/plan.py --config` plans
the model TerraTorch's CLI builds for the file (not terrascale's default model), and a training run picks what that
plan says for the same budget, keeps it on resume, and refuses (exit 2, nothing written) when nothing fits."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.integration import tt_configs as C
from tests.integration.helpers import ROOT, check, metrics, run_python, run_train

GiB = 1 << 30


def plan(config, *args) -> str:
    r = run_python([ROOT / "launch/plan.py", "--config", config, *args])
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return C.write_tiles(tmp_path_factory.mktemp("tt_auto") / "seg", "segmentation")


def test_plan_prints_the_table_of_the_files_own_model(tmp_path, data):
    """An SMPModelFactory file: its ResNet-18 encoder (11.2M) on the datamodule's 32 px tiles; the profiles whose
    backbone adaptation the run refuses for that encoder (no checkpointing switch) are refused in their rows."""
    out = plan(C.write_config(tmp_path, "smp_unet_ce", data), "--gpu-memory", "24GiB")
    assert out.startswith("SMPModelFactory SMPModelWrapper, backbone resnet18 (encoder): batch 2 x 6 bands x 32x32, "
                          "11.2M backbone"), out[:400]
    rows = {line.split()[0]: line for line in out.splitlines()[3:12]}
    assert "refused: memory.grad_checkpointing: the backbone ResNetEncoder has no checkpointing switch" in rows["lora"]
    assert "yes" in rows["full"].split()
    assert "auto: full, the fastest profile that fits" in out


@pytest.fixture(scope="module")
def roots(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("tt_auto_more")
    return {"segmentation": data, "regression": C.write_tiles(base / "reg", "regression"),
            "multimodal": C.write_multimodal(base / "mm")}


@pytest.mark.parametrize("name", list(C.configs()))
def test_every_factory_is_planned_on_the_model_it_builds(tmp_path, roots, name):
    """The plan's parameter count is the count of the model TerraTorch's CLI builds for the file (built here in
    the test process), on the file's own tiles and bands."""
    from trainer.config import load_experiment
    from trainer.model.terratorch_task import instantiate

    kind, section, data_kind = C.configs()[name]
    config = C.write_config(tmp_path, name, roots["multimodal" if data_kind == "multimodal" else kind])
    doc = json.loads(plan(config, "--json", "--gpu-memory", "24GiB"))
    exp = load_experiment(config)
    model = instantiate(exp.terratorch, exp.run.seed, with_data=False).task.model
    assert doc["backbone"].startswith(f"{section['init_args']['model_factory']} {type(model).__name__}")
    assert doc["counts"]["backbone"] + (doc["counts"]["head"] or 0) == sum(p.numel() for p in model.parameters())
    channels = 8 if data_kind == "multimodal" else 6
    assert {k: doc["input"][k] for k in ("batch", "channels", "height", "width")} == {
        "batch": 2, "channels": channels, "height": C.SIZE, "width": C.SIZE}
    if data_kind == "multimodal":
        assert doc["input"]["modalities"] == {"S2L2A": 6, "S1GRD": 2}
    assert doc["auto"]["profile"] == "full"  # tiny models on a 24 GiB card


@pytest.mark.slow
def test_auto_on_a_terratorch_file_picks_the_planned_profile_keeps_it_and_refuses_when_nothing_fits(tmp_path, data):
    config = C.write_config(tmp_path, "encdec_prithvi_ce_weights", data)
    doc = json.loads(plan(config, "--json", "--gpu-memory", "24GiB"))
    assert doc["backbone"] == "EncoderDecoderFactory PixelWiseModel, backbone prithvi_eo_tiny"
    assert doc["input"] == {"batch": 2, "dates": 1, "channels": 6, "height": C.SIZE, "width": C.SIZE}
    totals = {p["profile"]: p["gpu_bytes"]["total"] for p in doc["profiles"]}
    # just above what lora needs with the 10 % margin, below what full needs: the plan's own numbers decide
    assert totals["lora"] < totals["full"], totals
    budget = int(totals["lora"] / 0.9) + 1
    assert totals["full"] > 0.9 * budget, (totals, budget)
    planned = json.loads(plan(config, "--json", "--gpu-memory", str(budget)))["auto"]["profile"]
    assert planned == "lora"

    job = tmp_path / "job"
    common = [f"checkpoint.dir={job}", "memory.profile=auto", "trainer.max_steps=4", "run.progress=false"]
    r = check(run_train([*common, f"memory.gpu_memory={budget}", "run.stop_at_step=2"], config=config, timeout=900))
    assert yaml.safe_load((job / "config.yaml").read_text())["memory"]["profile"] == planned
    plan_txt = (job / "plan.txt").read_text()
    assert plan_txt.startswith(f"memory.profile: auto -> {planned}, the fastest profile that fits")
    assert "EncoderDecoderFactory PixelWiseModel, backbone prithvi_eo_tiny" in plan_txt and "GPU GiB" in plan_txt
    assert f"auto -> {planned}" in r.stderr + r.stdout
    assert f"profile {planned}" in r.stderr + r.stdout  # what the TerraTorch job trains with

    # resumed under a budget where a new job would get full: the checkpoints were written by lora
    r = check(run_train([*common, "memory.gpu_memory=24GiB"], config=config, timeout=900))
    assert "chosen when this job started" in r.stderr + r.stdout
    assert yaml.safe_load((job / "config.yaml").read_text())["memory"]["profile"] == planned
    assert [m["step"] for m in metrics(job)][-1] == 4
    assert (job / "export" / "model.safetensors").exists()

    bad = tmp_path / "none"
    r = run_train([f"checkpoint.dir={bad}", "memory.profile=auto", "memory.gpu_memory=0.5GiB", "run.progress=false"],
                  config=config, timeout=900)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "no memory profile fits EncoderDecoderFactory PixelWiseModel, backbone prithvi_eo_tiny in 0.5 GiB" \
        in r.stderr
    assert "zero3_offload" in r.stderr and "data.init_args.batch_size" in r.stderr  # the table and the fix
    assert not (bad / "checkpoints").exists() and not (bad / "config.yaml").exists()
