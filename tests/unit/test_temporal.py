"""Change-detection models: per-date shared encoder + fusion (TerraTorch's TemporalWrapper) and Prithvi's native
multi-frame input, built by `build_model` for `task.name: change_detection`.

The fusions are checked against features computed by hand from the same backbone; the full models against
shape, date-order sensitivity, a safetensors round trip through `load_exported`, and the memory-profile hooks.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import yaml

from trainer.config import Experiment, TaskConfig, build_experiment, dump_experiment
from trainer.errors import ConfigError
from trainer.model.temporal import FUSIONS, SharedEncoder, TemporalSettings, temporal_settings

NECKS = [{"name": "SelectIndices", "indices": [-4, -3, -2, -1]}, {"name": "ReshapeTokensToImage"},
         {"name": "LearnedInterpolateToPyramidal"}]
BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]


def change_task(fusion: str = "diff", num_dates: int = 2) -> TaskConfig:
    return TaskConfig(name="change_detection", fusion=fusion, num_dates=num_dates)


def change_exp(fusion: str = "diff", num_dates: int = 2, backbone: str = "prithvi_eo_tiny", **backbone_kwargs):
    kw = backbone_kwargs or {"img_size": 32, "bands": BANDS}
    exp = Experiment.model_validate({"model": {"backbone": backbone, "backbone_kwargs": kw, "necks": NECKS,
                                               "decoder": "UNetDecoder", "decoder_kwargs": {"channels": [32, 16, 8, 8]}},
                                     "task": {"name": "change_detection"}})
    return exp.model_copy(update={"task": change_task(fusion, num_dates)})


class ToyBackbone(nn.Module):
    """Two feature maps per image, like a conv backbone; TemporalWrapper reads `out_channels`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out_channels = [4, 4]

    def forward(self, x):
        f = self.conv(x)
        return [f, f.relu()]


def test_settings_default_and_refuse_bad_values():
    assert temporal_settings(TaskConfig(name="change_detection")) == TemporalSettings("diff", 2)
    assert temporal_settings(change_task("concat", 3)) == TemporalSettings("concat", 3)
    for bad, message in [({"fusion": "sum"}, r"task.fusion: .*'diff', 'concat' or 'native'"),
                         ({"num_dates": 1}, r"task.num_dates: .*greater than or equal to 2")]:
        with pytest.raises(ConfigError, match=message):
            build_experiment({"task": {"name": "change_detection", **bad}}, source="test")
    with pytest.raises(ConfigError, match="task.fusion and task.num_dates only apply to task.name=change_detection "
                                          r"\(this task is segmentation\): remove them"):
        build_experiment({"task": {"name": "segmentation", "fusion": "diff", "num_dates": 3}}, source="test")
    # a frozen job config of any task reloads (the fields dump as null)
    exp = build_experiment({"task": {"name": "regression", "loss": "mse"}}, source="test")
    assert build_experiment(yaml.safe_load(dump_experiment(exp)), source="frozen").task == exp.task


@pytest.mark.parametrize("fusion,num_dates", [("diff", 2), ("concat", 2), ("diff", 3), ("concat", 3)])
def test_shared_encoder_fuses_features_of_each_date(fusion, num_dates):
    torch.manual_seed(0)
    backbone = ToyBackbone()
    enc = SharedEncoder(backbone, fusion, num_dates)
    x = torch.randn(2, num_dates, 3, 8, 8)  # [B, T, C, H, W]
    per_date = [backbone(x[:, t]) for t in range(num_dates)]  # the same weights for every date
    for level, got in enumerate(enc(x)):
        f = [p[level] for p in per_date]
        if fusion == "concat":
            expect = torch.cat(f, dim=1)
        else:  # the last date subtracted from the mean of the earlier ones (== f0 - f1 for two dates)
            expect = torch.stack(f[:-1]).mean(0) - f[-1]
        torch.testing.assert_close(got, expect)
    assert enc.out_channels == [4 * num_dates] * 2 if fusion == "concat" else [4, 4]
    with pytest.raises(ConfigError, match=f"built for {num_dates} dates"):
        enc(torch.randn(2, num_dates + 1, 3, 8, 8))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_change_model_logits_order_and_export_round_trip(tmp_path, fusion):
    from trainer.model.models import build_model
    from trainer.train.export import load_exported, save_safetensors

    exp = change_exp(fusion)
    torch.manual_seed(0)
    model = build_model(exp).eval()
    x = torch.randn(2, 2, 6, 32, 32)
    with torch.no_grad():
        out = model(x).output
        swapped = model(x.flip(1)).output
    assert out.shape == (2, 2, 32, 32)  # [B, num_classes, H, W]
    assert not torch.allclose(out, swapped, atol=1e-4), "the model ignores which date is which"
    save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    with torch.no_grad():
        again = load_exported(exp, tmp_path)(x).output
    torch.testing.assert_close(again, out)


def test_native_fusion_runs_one_vit_over_all_frames():
    from trainer.model.models import build_model

    model = build_model(change_exp("native", num_dates=3))
    vit = model.encoder.backbone
    assert vit.patch_embed.input_size[0] == 3  # 3 frames in one token sequence
    assert model(torch.randn(1, 3, 6, 32, 32)).output.shape == (1, 2, 32, 32)


def test_diff_of_identical_dates_sees_no_change():
    from trainer.model.models import build_model

    torch.manual_seed(0)
    model = build_model(change_exp("diff")).eval()
    a, b = torch.randn(1, 6, 32, 32), torch.randn(1, 6, 32, 32)
    with torch.no_grad():  # f(a) - f(a) = 0 whatever a is: the decoder gets the same input
        out_a = model(torch.stack([a, a], 1)).output
        out_b = model(torch.stack([b, b], 1)).output
    torch.testing.assert_close(out_a, out_b)


def test_config_mistakes_name_the_key():
    from trainer.model.models import build_model

    with pytest.raises(ConfigError, match="task.fusion: 'native' is Prithvi's multi-frame input; 'terramind_v1_tiny'"):
        build_experiment({"model": {"backbone": "terramind_v1_tiny"},
                          "task": {"name": "change_detection", "fusion": "native"}}, source="test")
    with pytest.raises(ConfigError, match="model.backbone_kwargs.use_temporal"):
        build_model(change_exp("diff", img_size=32, bands=BANDS, use_temporal=True))
    with pytest.raises(ConfigError, match="num_frames=4 but task.num_dates=2"):
        build_model(change_exp("native", img_size=32, bands=BANDS, num_frames=4))


@pytest.mark.parametrize("backbone,kwargs,lora_name", [
    ("prithvi_eo_tiny", {"img_size": 32, "bands": BANDS}, "attn.qkv"),
    ("earthmind_4b", {"tiny": True, "in_channels": 6, "bands": BANDS}, "q_proj"),  # the VLM's own LoRA targets
])
def test_memory_profile_reaches_the_backbone_inside(backbone, kwargs, lora_name):
    from trainer.memory.profiles import PROFILES
    from trainer.model.fitting import apply_profile
    from trainer.model.models import build_model

    torch.manual_seed(0)
    model = apply_profile(build_model(change_exp("diff", backbone=backbone, **kwargs)),
                          replace(PROFILES["lora"], grad_checkpointing=True), torch.float32, zero_stage=0)
    lora = [n for n, _ in model.encoder.named_modules() if n.endswith(f"{lora_name}.lora_A")]
    assert lora, "LoRA adapters were not placed in the wrapped backbone"
    inner = model.encoder.get_base_model().backbone
    # HF layers carry a `gradient_checkpointing` flag; blocks without a switch get an instance-level forward
    # (the backbone itself is skipped: TerraTorch sets one on Prithvi to filter out_indices).
    assert any(getattr(m, "gradient_checkpointing", False) is True or "forward" in vars(m)
               for m in list(inner.modules())[1:]), "gradient checkpointing did not reach the wrapped backbone"
    out = model(torch.randn(2, 2, 6, 32, 32)).output
    out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.encoder.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
