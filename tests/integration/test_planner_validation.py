"""The planner's prediction vs the real peak of the same training step, on CPU, within ±10 %.

What is compared: on a CPU there is one device, so the planner's device-memory total for a CPU run (fp32, no
CUDA context) is compared with MemTracker's peak over *real* tensors: parameters, buffers, gradients, AdamW
states, activations and temporaries of the second training step (the first creates the optimizer states) of
the real model: terrascale's InternVL backbone at a small width with more layers than the planner traces
(so the depth extrapolation is exercised), TerraTorch's necks + UNet decoder + head, the profile applied by
`trainer.fitting.apply_profile` (real peft LoRA, real bitsandbytes NF4), fused AdamW and gradient clipping as
`trainer.run` builds them. The prediction goes through the planner's own path: meta-device counts, fake-tensor
traces at 2 and 4 layers per stack, the separate decoder trace, the states arithmetic.
ZeRO profiles are not compared here: on a CPU-only host DeepSpeed's "device" is the CPU that also holds the
offloaded states, so there is no device-memory figure to hold the GPU estimate against.
"""
from __future__ import annotations

import copy

import pytest
import torch

from trainer.backbones import catalog
from trainer.config import build_experiment
from trainer.memory import planner
from trainer.memory import workload as wl

TOLERANCE = 0.10
TILE, BATCH, BANDS = 64, 2, 6


def _experiment():
    return build_experiment({
        "model": {"backbone": "internvl2_5_4b",
                  "backbone_kwargs": {"mode": "full", "in_channels": BANDS, "image_size": TILE},
                  "necks": [{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "ReshapeTokensToImage"},
                            {"name": "LearnedInterpolateToPyramidal"}],
                  "decoder": "UNetDecoder", "decoder_kwargs": {"channels": [32, 16, 8, 4]}},
        "task": {"name": "segmentation", "num_classes": 3},
        "data": {"kind": "synthetic", "batch_size": BATCH, "synthetic": {"tile_size": TILE, "num_bands": BANDS}},
        "run": {"precision": "fp32", "grad_clip": 1.0},
    })


def _small_internvl():
    """InternVL2.5's architecture (InternViT + Qwen2 LM, same flavour switches) at a CPU-friendly size, deeper
    than the 2 and 4 layers the planner traces."""
    cfg = catalog.tiny_config("internvl2_5_4b")
    v, t = cfg.vision_config, cfg.text_config
    v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers = 96, 384, 4, 7
    t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 96, 256, 4, 2
    wl._set_layers(t, 6)
    t.head_dim = 24
    kwargs = {"mode": "full", "in_channels": BANDS, "image_size": TILE}
    spec = {"backbone": "validation-internvl", "config": cfg.to_dict(), "kwargs": kwargs}
    return wl.OwnBackbone(catalog.get("internvl2_5_4b"), kwargs, spec, config_value=cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trainer.plan_cli import terratorch_builders

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TERRASCALE_CACHE", str(tmp_path_factory.mktemp("cache")))  # measure now, reuse nothing
        exp, own, builders = _experiment(), _small_internvl(), terratorch_builders()
        plan = planner.plan_experiment(exp, 1 << 40, 1 << 40, builders=builders, device="cpu",
                                       profiles=("full", "lora", "qlora"), backbone=own)
        assert plan.measured_now, "the validation must trace, not read a cache"
        yield exp, own, builders, plan


def _real_peak(exp, own, builders, profile_name: str) -> dict[str, int]:
    from trainer.backbones.factory import _model_class
    from trainer.fitting import apply_profile
    from trainer.memory.trace import trace_step
    from trainer.tasks import build_loss

    torch.manual_seed(0)
    backbone = _model_class(own.family)(copy.deepcopy(own.config), **own.kwargs)
    backbone.finalize()
    model = apply_profile(builders.around(exp, backbone), planner.profile_for(exp, profile_name), torch.float32, 0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as trainer.run.build_optimizer
    loss_fn = build_loss(exp.task)
    batch = {}

    def inputs():
        batch["y"] = torch.randint(0, exp.task.num_classes, (BATCH, TILE, TILE))
        return (torch.randn(BATCH, BANDS, TILE, TILE),)

    def loss(out):
        return loss_fn(out.output.float(), batch["y"])

    x = inputs()  # step 1 creates the optimizer states; step 2 is the one measured
    loss(model(*x)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del x
    t = trace_step(model, inputs, loss, optimizer=optimizer, grad_clip=exp.run.grad_clip, count_flops=False)
    return t.peak


@pytest.mark.parametrize("profile", ["full", "lora", "qlora"])
def test_prediction_within_ten_percent_of_the_real_step(setup, profile):
    exp, own, builders, plan = setup
    est = plan.estimates[profile]
    real = _real_peak(exp, own, builders, profile)
    predicted = est.gpu["total"]
    error = predicted / real["total"] - 1
    print(f"\n{profile}: predicted {predicted / 2**20:.2f} MiB {est.gpu} vs real {real['total'] / 2**20:.2f} MiB "
          f"{real} ({error:+.1%})")
    assert abs(error) <= TOLERANCE, f"{profile}: planner {predicted} B vs real step {real['total']} B ({error:+.1%})"


def test_the_validation_model_is_deeper_than_the_traces(setup):
    """The check above exercises extrapolation only if the real model has more layers than the traces."""
    _, own, _, plan = setup
    model = wl.build(own)
    stacks = wl.stacks(own, model)
    assert stacks["vision"] > 4 and stacks["text"] > 4
    assert plan.estimates["full"].traced
