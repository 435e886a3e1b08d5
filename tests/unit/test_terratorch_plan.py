"""The planner on a model handed in whole (what `trainer.plan.terratorch_plan` does for a `terratorch fit` file), without
TerraTorch: tiny torch models stand in for the one TerraTorch's CLI builds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import Experiment, TerraTorchSpec
from trainer.errors import PlanError
from trainer.memory.profiles import PROFILES, adapts_backbone, no_backbone_problem
from trainer.plan import planner
from trainer.plan.head import Builders
from trainer.plan.workload import InputShape

GiB = 1 << 30
MODS = (("S2L2A", 6), ("S1GRD", 2))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, dim)  # a LoRA target name of trainer.model.fitting.VIT_LORA_TARGETS

    def forward(self, x):
        return x + self.attn.qkv(x)


class Encoder(nn.Module):
    def __init__(self, channels: int, dim: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(channels, dim, 3, padding=1)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(2)])  # trainer.model.fitting checkpoints these

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for b in self.blocks:
            x = b(x)
        return x.permute(0, 3, 1, 2)


class WithEncoder(nn.Module):
    """Takes {modality: [B, C, H, W]} as TerraMind does, backbone at `encoder`."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder(sum(c for _, c in MODS))
        self.head = nn.Conv2d(32, 2, 1)

    def forward(self, x: dict):
        return self.head(self.encoder(torch.cat([x[name] for name, _ in MODS], dim=1)))


class NoBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Encoder(6)
        self.head = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _exp() -> Experiment:
    spec = TerraTorchSpec(config={"model": {"class_path": "SemanticSegmentationTask", "init_args": {"model_args": {
        "num_classes": 2}}}, "data": {"class_path": "X"}}, source="tt.yaml")
    return Experiment(terratorch=spec)


def _inputs(model_cls, path, shape):
    def around(exp, backbone):
        raise AssertionError("a whole model is never split")

    return {"builders": Builders(full_model=lambda exp: model_cls(), around=around, backbone_path=lambda m: path),
            "shape": shape, "label": f"test {model_cls.__name__}"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TERRASCALE_CACHE", str(tmp_path / "cache"))


def test_a_model_without_backbone_is_planned_only_under_profiles_that_leave_it_alone():
    exp = _exp()
    plan = planner.plan_experiment(exp, 24 * GiB, 64 * GiB, **_inputs(NoBackbone, None, InputShape(2, 6, 16, 16)),
                                   no_backbone="NoBackbone")
    for name, est in plan.estimates.items():
        if adapts_backbone(PROFILES[name]):  # lora, qlora and the ZeRO-3 profiles (grad checkpointing)
            assert est.refused == f"refused: {no_backbone_problem(PROFILES[name], 'NoBackbone')}", name
        else:
            assert est.refused is None and est.gpu["total"] > 0, name
    assert {n for n, e in plan.estimates.items() if e.refused is None} == {"full", "zero2"}
    # the whole model counts as the backbone (every parameter trains)
    assert plan.counts["backbone"] == sum(p.numel() for p in NoBackbone().parameters())
    assert planner.pick(plan)[0] == "full"
    assert plan.table().startswith("test NoBackbone (encoder): batch 2 x 6 bands x 16x16")


def test_a_multimodal_model_with_an_encoder_is_planned_under_every_profile_and_refused_when_nothing_fits():
    exp = _exp()
    shape = InputShape(2, 8, 16, 16, modalities=MODS)
    plan = planner.plan_experiment(exp, 24 * GiB, 64 * GiB, **_inputs(WithEncoder, "encoder", shape))
    assert all(e.refused is None for e in plan.estimates.values()), {n: e.refused for n, e in
                                                                      plan.estimates.items()}
    model = WithEncoder()
    assert plan.counts["backbone"] == sum(p.numel() for p in model.encoder.parameters())
    assert plan.counts["head"] == sum(p.numel() for p in model.head.parameters())
    lora, full = plan.estimates["lora"], plan.estimates["full"]
    assert lora.gpu["optimizer"] < full.gpu["optimizer"]  # LoRA: no optimizer states for the frozen encoder
    assert "8 bands (S2L2A 6 + S1GRD 2) x 16x16" in plan.table()
    assert plan.to_json()["input"]["modalities"] == {"S2L2A": 6, "S1GRD": 2}

    with pytest.raises(PlanError) as err:  # the CUDA context alone is 0.75 GiB
        planner.choose_profile(exp, GiB // 2, 64 * GiB, **_inputs(WithEncoder, "encoder", shape))
    text = str(err.value)
    assert "no memory profile fits test WithEncoder in 0.5 GiB" in text and "zero3_offload " in text
    assert "lower data.init_args.batch_size" in text


def test_multimodal_shapes_make_one_tensor_per_modality_and_single_shapes_keep_their_cache_keys():
    shape = InputShape(2, 8, 16, 12, modalities=MODS)
    batch = shape.example(torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "S2L2A": ((2, 6, 16, 12), torch.bfloat16), "S1GRD": ((2, 2, 16, 12), torch.bfloat16)}
    assert shape.key()["modalities"] == [["S2L2A", 6], ["S1GRD", 2]]
    single = InputShape(2, 6, 16, 16)
    assert single.key() == {"batch": 2, "channels": 6, "height": 16, "width": 16}
    assert tuple(single.example(torch.float32).shape) == (2, 6, 16, 16)


def test_the_files_frozen_backbone_sgd_and_pretrained_flags_reach_the_plan():
    from trainer.plan.terratorch_plan import loads_pretrained, planning_view, without_pretrained

    spec = TerraTorchSpec(config={
        "model": {"class_path": "SemanticSegmentationTask", "init_args": {
            "freeze_backbone": True, "model_args": {"backbone": "prithvi_eo_tiny", "backbone_pretrained": True}}},
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}})
    exp = Experiment(terratorch=spec)
    view = planning_view(exp)
    assert view.model.freeze_backbone and view.optim.name == "sgd"
    assert not exp.model.freeze_backbone and exp.optim.name == "adamw"  # the run's own config is left alone
    assert loads_pretrained(exp)
    meta = without_pretrained(spec)
    assert meta.config["model"]["init_args"]["model_args"]["backbone_pretrained"] is False
    assert spec.config["model"]["init_args"]["model_args"]["backbone_pretrained"] is True
    adamw = Experiment(terratorch=TerraTorchSpec(config={"model": {"class_path": "X", "init_args": {}},
                                                         "optimizer": {"class_path": "AdamW"}}))
    assert planning_view(adamw).optim.name == "adamw" and not planning_view(adamw).model.freeze_backbone
