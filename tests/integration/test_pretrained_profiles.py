"""A sharded bf16 checkpoint through the real entry point under the profiles large backbones use.

The checkpoint is a tiny InternVL2-40B-class model (InternViT + Llama-shaped LM, native `save_pretrained`
layout, bf16, several shards): tiny so CI can afford it; the real-width measurements are `launch/bench.py
load`. Each run must load the checkpoint into the layout the profile trains (NF4 on arrival for qlora,
ZeRO-3 partitions for zero3_offload_lora, bf16 frozen weights for a bf16 lora run), train, and export only what
trained (no frozen base weight: the export records the base's fingerprint instead).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.integration.helpers import ROOT, check, run_train as _run

from trainer.backbones import catalog

CONFIG = ROOT / "launch/configs/internvl2_26b_forest.yaml"


def run_train(overrides: list[str], nproc: int = 1):
    return _run(overrides, nproc, config=CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "internvl_tiny"
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(catalog.tiny_config("internvl2_40b")).to(torch.bfloat16)
    model.save_pretrained(str(path), max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) >= 3, "the test needs a sharded checkpoint"
    return path


def reference(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the backbone's own names (transformers saves the v4 layout:
    `language_model.model.layers.*`, `vision_tower.*`; the backbone holds `language_model.layers.*`)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k.removeprefix("model.").replace("language_model.model.", "language_model."): v
                    for k, v in load_file(str(f)).items()})
    return out


def overrides(tmp_path, checkpoint, profile: str, *extra: str) -> list[str]:
    return [f"model.backbone=internvl2_40b", f"model.backbone_kwargs.pretrained_path={checkpoint}",
            "model.backbone_kwargs.image_size=56", f"memory.profile={profile}", f"data.root={tmp_path / 'data'}",
            "data.synthetic.n_train=8", "data.synthetic.n_val=2", "data.synthetic.tile_size=32", "data.batch_size=2",
            "run.max_steps=4", "run.eval_every=4", "run.checkpoint_every=2", "run.log_every=1", "run.progress=false",
            "scheduler.warmup_steps=1", f"checkpoint.dir={tmp_path / 'job'}", *extra]


def frozen_base(export: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """(exported, checkpoint) pairs for backbone weights LoRA did not adapt: they must be untouched."""
    pairs = {}
    for key, value in export.items():
        if not key.startswith("encoder.") or "lora_" in key:
            continue
        name = key.removeprefix("encoder.").removeprefix("base_model.model.").replace(".base_layer.", ".")
        if name in ref and ref[name].shape == value.shape:
            pairs[name] = (value, ref[name])
    return pairs


def small_export(job, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The export holds no base weight, and names the checkpoint it expects; returns its tensors."""
    export = load_file(str(job / "export" / "model.safetensors"))
    assert not frozen_base(export, ref), "the export repeats frozen base weights"
    manifest = json.loads((job / "export" / "export.json").read_text())
    assert manifest["kind"] == "lora" and manifest["base"]["sha256"]
    return export


def _load_json(job) -> dict:
    return json.loads((job / "load.json").read_text())


@pytest.mark.slow
def test_zero3_offload_lora_loads_into_partitions_trains_resumes_and_exports(tmp_path, checkpoint):
    job = tmp_path / "job"
    check(run_train(overrides(tmp_path, checkpoint, "zero3_offload_lora", "run.stop_at_step=2")))
    assert (job / "checkpoints" / "step-000002").is_dir()
    r = check(run_train(overrides(tmp_path, checkpoint, "zero3_offload_lora")))
    assert "resumed from" in r.stderr + r.stdout
    info = _load_json(job)
    assert info["tensors"] > 20 and info["missing"] == 0 and info["unexpected"] == 0
    assert info["skipped"] >= 1  # the LM head and text embeddings are in the file, never read
    small_export(job, reference(checkpoint))


@pytest.mark.slow
def test_zero3_offload_lora_two_processes(tmp_path, checkpoint):
    job = tmp_path / "job"
    check(run_train(overrides(tmp_path, checkpoint, "zero3_offload_lora", "run.max_steps=2"), nproc=2))
    small_export(job, reference(checkpoint))


@pytest.mark.slow
def test_qlora_quantizes_on_arrival_and_trains(tmp_path, checkpoint):
    job = tmp_path / "job"
    check(run_train(overrides(tmp_path, checkpoint, "qlora", "run.max_steps=2")))
    info = _load_json(job)
    assert info["seconds"]["quantize"] > 0, "no layer was quantized while loading"
    assert info["missing"] == 0
    small_export(job, reference(checkpoint))


@pytest.mark.slow
def test_bf16_lora_holds_frozen_weights_in_bf16(tmp_path, checkpoint):
    job = tmp_path / "job"
    check(run_train(overrides(tmp_path, checkpoint, "lora", "run.max_steps=1", "run.precision=bf16")))
    ref = reference(checkpoint)
    small_export(job, ref)
    lora = load_file(str(job / "export" / "adapter" / "adapter_model.safetensors"))
    assert lora and all(v.dtype == torch.float32 for v in lora.values()), "what trains stays fp32"
    # export.json records the run's precision (Job.precision), which predict then defaults to
    assert json.loads((job / "export" / "export.json").read_text())["precision"] == "bf16"
    # predict's loader streams the base from the checkpoint in bf16, bit for bit, under the export's adapters
    from trainer.predict.inference import load_for_inference

    im = load_for_inference(job / "export", "bf16", device="cpu")
    pairs = frozen_base(im.model.state_dict(), ref)
    assert len(pairs) > 20 and all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in pairs.values())
