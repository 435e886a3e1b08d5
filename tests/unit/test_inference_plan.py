"""The planner's prediction (inference) estimate vs the real forward of the same model on CPU, within ±10 %.

Same shape as the training validation (tests/integration/test_planner_validation.py), kept a unit test: the
decoder is a small pure-torch head handed in as the planner's `Builders` (no TerraTorch import), and the
backbone is terrascale's InternVL class at a small width, deeper than the 2 and 4 layers the planner traces, so
the depth extrapolation is exercised. The estimate goes through the planner's own path (meta-device counts,
fake-tensor forward traces at reduced depth, the decoder traced apart, the weight arithmetic); the measurement
is MemTracker's peak over *real* tensors of one no_grad forward of the real model in the same dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.small_models import small_internvl
from trainer.config import build_experiment
from trainer.plan import head as head_mod
from trainer.plan import workload as wl
from trainer.plan.inference import PRECISIONS, plan_inference, weight_bytes
from trainer.plan.trace import set_dtype_, trace_forward

TOLERANCE = 0.10
TILE, BANDS, WINDOWS = 64, 6, 3


class TinyHead(nn.Module):
    """Stands in for TerraTorch's necks + decoder: a 1x1 projection of every feature, summed, to class logits."""

    def __init__(self, encoder: nn.Module, channels: list[int], classes: int = 3):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.ModuleList(nn.Linear(c, 32) for c in channels)
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        feats = self.encoder(x)
        return self.out(sum(p(f.flatten(2).transpose(1, 2) if f.dim() == 4 else f)
                            for p, f in zip(self.proj, feats)))


BUILDERS = head_mod.Builders(full_model=None, around=lambda exp, bb: TinyHead(bb, bb.out_channels))


def _experiment():
    return build_experiment({
        "model": {"backbone": "internvl2_5_4b",
                  "backbone_kwargs": {"mode": "full", "in_channels": BANDS, "image_size": TILE},
                  "decoder": "TinyHead-of-test_inference_plan"},  # a cache key only: BUILDERS builds the head
        "task": {"name": "segmentation", "num_classes": 3},
        "data": {"kind": "synthetic", "batch_size": WINDOWS, "synthetic": {"tile_size": TILE, "num_bands": BANDS}},
    })


def _small_internvl():
    return small_internvl("inference-validation-internvl", BANDS, TILE)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TERRASCALE_CACHE", str(tmp_path_factory.mktemp("cache")))  # trace now, reuse nothing
        own = _small_internvl()
        plan = plan_inference(_experiment(), 1 << 40, 1 << 40, builders=BUILDERS, device="cpu", backbone=own)
        assert plan.measured_now, "the validation must trace, not read a cache"
        yield own, plan


def _real_forward(own, dtype: torch.dtype) -> dict[str, int]:
    from trainer.backbones.factory import family_class

    torch.manual_seed(0)
    backbone = family_class(own.family)(copy.deepcopy(own.config), **own.kwargs)
    backbone.finalize()
    model = set_dtype_(TinyHead(backbone, backbone.out_channels), dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    t = trace_forward(model, lambda: (torch.randn(WINDOWS, BANDS, TILE, TILE, dtype=dtype),), count_flops=False)
    return t["peak"]


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_inference_estimate_within_ten_percent_of_a_real_forward(planned, precision, dtype):
    own, plan = planned
    est = plan.estimates[precision]
    real = _real_forward(own, dtype)
    error = est.gpu["total"] / real["total"] - 1
    print(f"\n{precision}: planned {est.gpu} vs real {real} ({error:+.1%})")
    assert abs(error) <= TOLERANCE, f"{precision}: planned {est.gpu['total']} B vs real {real['total']} B ({error:+.1%})"
    # and the part above the weights alone (what the traces add), within the same tolerance
    dyn_real = real["total"] - real["params"] - real["buffers"]
    assert abs(est.gpu["activations"] / dyn_real - 1) <= TOLERANCE, (est.gpu, real)


def test_the_validation_model_is_deeper_than_the_traces(planned):
    own, _ = planned
    stacks = wl.stacks(own, wl.build(own))
    assert stacks["vision"] > 4 and stacks["text"] > 4


def test_precisions_order_weights_and_the_batch_grows_linearly(planned):
    own, plan = planned
    e = plan.estimates
    assert set(e) == set(PRECISIONS)
    weights = [e[p].gpu["weights"] for p in ("nf4", "int8", "bf16", "fp32")]
    assert weights == sorted(weights) and weights[0] < weights[-1]
    assert e["fp32"].gpu["weights"] == 2 * e["bf16"].gpu["weights"]
    assert e["bf16"].flops_per_window == e["fp32"].flops_per_window > 0
    assert e["bf16"].windows_per_s == pytest.approx(165.2e12 / e["bf16"].flops_per_window)
    # the per-window growth is what a larger batch adds: 3 windows hold more than 1
    assert e["bf16"].per_window > 0
    small = plan_inference(_experiment(), 1 << 40, 1 << 40, windows=1, builders=BUILDERS, device="cpu",
                           backbone=own, precisions=("bf16",))
    assert small.estimates["bf16"].gpu["activations"] + 2 * e["bf16"].per_window == e["bf16"].gpu["activations"]


def test_max_windows_is_the_largest_batch_within_the_budget(planned):
    own, plan = planned
    e = plan.estimates["bf16"]
    one = e.gpu["total"] - (WINDOWS - 1) * e.per_window
    budget = one + 5 * e.per_window + e.per_window // 2  # room for 1 + 5 windows, not 7
    tight = plan_inference(_experiment(), budget, 1 << 40, builders=BUILDERS, device="cpu", backbone=own,
                           precisions=("bf16",))
    assert tight.estimates["bf16"].max_windows == 6


def test_weight_bytes_per_precision():
    c = {"total": 1000, "linear_weights": 640, "linear_numels": {"64": 10}, "head": 100, "lora": 20}
    assert weight_bytes(c, "fp32") == 4 * 1120
    assert weight_bytes(c, "bf16") == 2 * 1120
    assert weight_bytes(c, "int8") == 640 + 2 * (360 + 120)
    from trainer.memory.states import nf4_bytes

    assert weight_bytes(c, "nf4") == 10 * nf4_bytes(64) + 2 * (360 + 120)


def test_unknown_precision_is_a_config_error_naming_the_choices():
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="--precision int4: choose from nf4, int8, bf16, fp32"):
        plan_inference(_experiment(), 1 << 30, 1 << 30, precisions=("int4",))
