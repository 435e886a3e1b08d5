"""A QLoRA job of an InternVL2-40B-class checkpoint predicts a georeferenced scene from its small export + the base.

One job (module fixture) trains 2 steps under qlora on a synthetic bf16 checkpoint (trainer.backbones.synth_checkpoint:
InternVL2-40B's structure at half width, 1 vision + 1 LLM layer, 0.21B parameters, 5 shards; half width as in
test_big_load: at full width the NF4 quantization alone costs ~45 s per load on this CPU, and this test loads the
base three times). Checked:
- the export holds what trained and nothing the base provides: adapters (peft) + necks/decoder/head + our input
  adapter; its tensors add up to the job's trainable parameters (the 21-parameter input adapter aside), and not
  one of its keys is a checkpoint tensor;
- `launch/predict.py` in nf4 and in bf16 (the base streamed from the checkpoint, quantized at load or held in
  bf16) writes a class map with the scene's CRS/transform, within a peak-RSS bound (wide margin), the two maps
  agreeing on most pixels;
- a base with the same shapes but other values (another seed: only the fingerprint's content samples differ) is
  refused with exit 2 and nothing is written;
- `terrascale export --merge` states the merged file's size before writing, and writes exactly that many bytes.
Real-width numbers (export sizes, RSS, windows/s) are in the README (measured outside CI).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from safetensors import safe_open

from tests.integration.helpers import ROOT, check, env, run_python, run_train
from trainer.backbones import synth_checkpoint

CONFIG = ROOT / "launch/configs/internvl2_40b_forest.yaml"
WIDTH_DIVISOR = 2
PEAK_RSS_BOUND = 3.5e9  # measured 2.0 GB (nf4) / 1.9 GB (bf16) here; a merged fp32 copy of the 40B would be 160 GB


def _predict_args(job, scene, out, *extra) -> list[str]:
    return [str(ROOT / "launch/predict.py"), "--job", str(job), "--input", str(scene), "--out", str(out), "--tile",
            "32", "--overlap", "8", "--no-quicklook", *extra]


def _predict(job, scene, out, *extra):
    """A real predict process, its peak RSS sampled."""
    from trainer.bench.bench_load import PeakSampler

    cmd = [sys.executable, *_predict_args(job, scene, out, *extra)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakSampler(p.pid)
    stdout, stderr = p.communicate(timeout=900)
    sampler.stop()
    return p.returncode, stdout + stderr, sampler.peak()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_export")
    ckpt = root / "ckpt"
    info = synth_checkpoint.write_checkpoint(ckpt, 1, 1, "native", width_divisor=WIDTH_DIVISOR, shard_bytes=128 << 20)
    job = root / "job"
    r = check(run_train([f"model.backbone_kwargs.pretrained_path={ckpt}", "model.backbone_kwargs.image_size=56",
                         f"data.root={root / 'data'}", "data.synthetic.n_train=4", "data.synthetic.n_val=1",
                         "data.synthetic.tile_size=32", "run.max_steps=2", "run.eval_every=1000",
                         "run.checkpoint_every=1000", "run.log_every=1", "run.progress=false",
                         "scheduler.warmup_steps=1", f"checkpoint.dir={job}"], config=CONFIG, timeout=1500))
    rng = np.random.default_rng(0)
    scene = root / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=80, width=112, count=6, dtype="uint16", crs="EPSG:32650",
                       transform=Affine(10, 0, 500_000, 0, -10, 620_000), nodata=0) as dst:
        dst.write(rng.integers(300, 3000, (6, 80, 112)).astype("uint16"))
    return {"root": root, "ckpt": ckpt, "info": info, "job": job, "scene": scene, "log": r.stdout + r.stderr}


def _keys(path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def test_small_export_is_what_trained_and_merge_states_its_size(job):
    export = job["job"] / "export"
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["kind"] == "lora" and manifest["quantization"] == "nf4"
    assert manifest["base"]["method"] == "headers+sizes+samples" and len(manifest["base"]["files"]) == 5
    rest, adapter = _keys(export / "model.safetensors"), _keys(export / "adapter" / "adapter_model.safetensors")
    numel = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())  # noqa: E731
    trainable = float(re.search(r"profile qlora: ([\d.]+)M of", job["log"])[1]) * 1e6
    assert abs(numel(rest) + numel(adapter) - trainable) <= 0.006e6 + 21, (numel(rest), numel(adapter), trainable)
    written = {s.name for s in synth_checkpoint.native_specs(synth_checkpoint.config_for(
        "internvl2_40b", 1, 1, job["info"]["vocab"], WIDTH_DIVISOR))}
    ours = {k.removeprefix("encoder.").replace("language_model.", "language_model.model.", 1) for k in rest} | \
        {k.removeprefix("encoder.") for k in rest}
    assert not ours & written, f"the export repeats base tensors: {sorted(ours & written)[:3]}"
    assert not [k for k in rest if k.startswith("encoder.") and not k.startswith("encoder.input_adapter.")]
    size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file() and p.name != "export.json")
    assert manifest["bytes"] == size and size < 0.1 * job["info"]["bytes"]  # export.json: the files beside it

    r = run_python(["-m", "trainer", "export", "--job", str(job["job"]), "--merge"], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    stated = float(re.search(r"merged export: ([\d.]+) GB \(bf16", r.stdout)[1]) * 1e9
    merged = export / "model.merged.safetensors"
    assert abs(merged.stat().st_size - stated) < 0.006e9
    shapes = _keys(merged)
    assert not [k for k in shapes if "lora_" in k or "base_layer" in k or ".absmax" in k]
    with safe_open(str(merged), "pt") as f:
        w = f.get_tensor("encoder.language_model.layers.0.self_attn.q_proj.weight")
    assert str(w.dtype) == "torch.bfloat16" and tuple(w.shape) == (7168 // WIDTH_DIVISOR, 7168 // WIDTH_DIVISOR)


def test_predicts_nf4_and_bf16_from_the_base_and_refuses_another_base(job):
    outs, src = {}, rasterio.open(job["scene"])
    for precision in ("nf4", "bf16"):
        out = job["root"] / f"pred_{precision}.tif"
        code, log, peak = _predict(job["job"], job["scene"], out, "--precision", precision)
        assert code == 0, log[-4000:]
        print(f"{precision}: peak RSS {peak / 1e9:.2f} GB; {log.strip().splitlines()[-1]}")
        assert peak < PEAK_RSS_BOUND, f"{precision}: peak RSS {peak / 1e9:.2f} GB"
        with rasterio.open(out) as o:
            assert (o.crs, o.transform, o.shape) == (src.crs, src.transform, src.shape)
            assert o.tags()["precision"] == precision
            outs[precision] = o.read(1)
    agree = (outs["nf4"] == outs["bf16"]).mean()
    assert agree > 0.9, f"nf4 and bf16 predictions agree on {agree:.1%} of pixels"

    other = job["root"] / "other_base"
    synth_checkpoint.write_checkpoint(other, 1, 1, "native", seed=1, width_divisor=WIDTH_DIVISOR,
                                      shard_bytes=128 << 20)
    out = job["root"] / "refused.tif"
    r = run_python(_predict_args(job["job"], job["scene"], out, "--base", str(other)), timeout=900)
    code, log = r.returncode, r.stdout + r.stderr  # (no memory measured: a warm child will do)
    assert code == 2, log[-3000:]
    assert "not the one this export was trained on" in log and str(other) in log and "Traceback" not in log
    assert not out.exists()
