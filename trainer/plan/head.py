"""The parts TerraTorch builds, traced on fake tensors: necks + decoder + head, or a whole model.

- `head_step`: the experiment's own necks, decoder and head (TerraTorch's `EncoderDecoderFactory`) around a
  stand-in backbone that returns features of the traced backbone's exact shapes and dtypes. One cached
  measurement per (head config, feature shapes, batch, tile, dtype policy): the first plan of a new head
  imports TerraTorch (11–17 s); later plans, and the shipped seed (`plan_cache`), do not.
- `whole_step`: backbones TerraTorch itself builds (Prithvi, TerraMind, Clay, anything outside the catalog)
  are traced whole, at full depth (they are ≤ 32 layers).

TerraTorch is reached only through `Builders` handed in by the caller (the CLI passes
`trainer.plan.builders.terratorch_builders()`): the planner imports TerraTorch and `trainer.model.models` only there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import Experiment
from trainer.errors import PlanError
from trainer.memory.profiles import compute_dtype
from trainer.plan import plan_cache
from trainer.plan.workload import InputShape, TraceMode, package_version, count_params, input_dtype, \
    prepare_for_trace


@dataclass(frozen=True)
class Builders:
    """Model builders that import TerraTorch, passed in from above."""

    full_model: Callable[[Experiment], nn.Module]                # the experiment's EncoderDecoder
    around: Callable[[Experiment, nn.Module], nn.Module]         # the same necks/decoder/head around a backbone
    # where the backbone the profile adapts sits in `full_model`'s model (None: it has none; only profiles that
    # leave the backbone alone are planned then, `trainer.memory.profiles.adapts_backbone`)
    backbone_path: Callable[[nn.Module], str | None] = lambda model: "encoder"


class FeatureStub(nn.Module):
    """Stands in for a backbone: returns the given features (leaf tensors that take gradients)."""

    patch_size = None  # no padding by TerraTorch (our backbones size tiles themselves)

    def __init__(self, out_channels: list[int], features: list[torch.Tensor]):
        super().__init__()
        self.out_channels = list(out_channels)
        self._features = features

    def forward(self, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        return list(self._features)


def task_loss(exp: Experiment, shape: InputShape) -> tuple[Callable, Callable]:
    """(make_target, loss_fn) as the loop calls it: `loss_fn(out.float(), target)`. Cross-entropy for the
    pixel-wise classification tasks and MSE for regression stand in for the configured TerraTorch loss (dice/focal
    keep a few more logit-sized tensors: not traced; regression's sigmoid is the head's final activation, traced
    with the head)."""
    if exp.task.kind.continuous:
        return (lambda: torch.randn(shape.batch, shape.height, shape.width),
                lambda out, y: F.mse_loss(_logits(out).float().squeeze(1), y))
    return (lambda: torch.zeros(shape.batch, shape.height, shape.width, dtype=torch.long),
            lambda out, y: F.cross_entropy(_logits(out).float(), y, ignore_index=exp.task.ignore_index))


def _logits(out):
    return out.output if hasattr(out, "output") else out


def _model_spec(exp: Experiment) -> dict:
    m = exp.model
    return {"necks": m.necks, "decoder": m.decoder, "decoder_kwargs": m.decoder_kwargs, "head_kwargs": m.head_kwargs,
            "task": exp.task.name, "num_classes": exp.task.num_classes}


def _trace_with_loss(exp, model, shape, mode, fake, extra_inputs=()) -> dict:
    from trainer.plan.trace import trace_forward, trace_step

    if mode.inference:  # prediction: the forward alone, no loss
        t = trace_forward(model, lambda: (shape.example(input_dtype(mode)),), fake_mode=fake)
        return dict(peak=t["peak"], flops=t["flops"])

    make_target, loss = task_loss(exp, shape)
    holder = {}

    def inputs():
        holder["y"] = make_target()
        return (shape.example(input_dtype(mode)),)

    t = trace_step(model, inputs, lambda out: loss(out, holder["y"]),
                   autocast=compute_dtype(mode.precision) if mode.autocast else None, fake_mode=fake)
    return dict(peak=t.peak, peak_with_grads=t.peak_with_grads, after_forward=t.after_forward, flops=t.flops)


def head_step(exp: Experiment, outputs: list[list[int]], out_dtypes: list[str], out_channels: list[int],
              shape: InputShape, mode: TraceMode, builders: Builders | None) -> tuple[dict, bool]:
    """The head's traced step on top of features shaped `outputs`; (result, was_cached)."""
    spec = {"kind": "head", **_model_spec(exp), "features": outputs, "feature_dtypes": out_dtypes,
            "out_channels": out_channels, "input": shape.key(),
            "mode": {"precision": mode.precision, "autocast": mode.autocast, **({"inference": True} if mode.inference
                                                                                 else {})}, "torch": torch.__version__,
            "terratorch": package_version("terratorch")}

    def compute() -> dict:
        if builders is None:
            raise PlanError(f"the decoder of this experiment ({exp.model.decoder} with necks "
                            f"{[n.get('name') for n in exp.model.necks]}) has not been measured at these feature "
                            "shapes yet: run `terrascale plan --config ...` once (it imports TerraTorch, ~20 s), "
                            "or pass builders=trainer.plan.builders.terratorch_builders()")
        from torch._subclasses.fake_tensor import FakeTensorMode

        from trainer.plan.trace import meta_to_fake_

        fake = FakeTensorMode()
        with fake:
            feats = [torch.empty(s, dtype=getattr(torch, d), requires_grad=not mode.inference)
                     for s, d in zip(outputs, out_dtypes)]
        stub = FeatureStub(out_channels, feats)
        with torch.device("meta"):
            model = builders.around(exp, stub)
        with fake:
            prepare_for_trace(meta_to_fake_(model), mode if mode.inference else dataclasses.replace(
                mode, lora=None, grad_checkpointing=False, train_backbone=True, four_bit=False))
        params = sum(p.numel() for p in model.parameters())
        result = _trace_with_loss(exp, model, shape, mode, fake)
        return {**result, "params": params,
                "largest_layer": max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                                     default=0)}

    return plan_cache.cached(spec, compute)


def whole_step(exp: Experiment, shape: InputShape, mode: TraceMode, builders: Builders | None,
               lora_targets_of: Callable[[nn.Module], list[str] | None]) -> tuple[dict, bool]:
    """A TerraTorch-built model traced whole at full depth; (result incl. counts, was_cached). For a `terratorch
    fit` file the model is the one its model section builds (keyed by that section)."""
    model_spec = exp.model.model_dump(mode="json") if exp.terratorch is None else {
        "terratorch": exp.terratorch.config["model"], "custom_modules_path": exp.terratorch.custom_modules_path}
    spec = {"kind": "whole", "model": model_spec, "task": _model_spec(exp),
            "input": shape.key(), "mode": mode.key(), "torch": torch.__version__,
            "terratorch": package_version("terratorch")}

    def compute() -> dict:
        if builders is None:
            raise PlanError(f"model.backbone {exp.model.backbone!r} is built by TerraTorch; planning it imports "
                            "TerraTorch once (~20 s): run `terrascale plan --config ...`, or pass "
                            "builders=trainer.plan.builders.terratorch_builders()")
        from torch._subclasses.fake_tensor import FakeTensorMode

        from trainer.backbones.catalog import MetaButCpuLinspace  # TerraMind's linspace(...).item() at build
        from trainer.plan.trace import meta_to_fake_

        with torch.device("meta"), MetaButCpuLinspace():
            model = builders.full_model(exp)
        path = builders.backbone_path(model)
        if path is None and (mode.lora or mode.grad_checkpointing or mode.four_bit):
            raise PlanError(f"{type(model).__name__} has no backbone to adapt: this profile cannot be planned")
        # no backbone found: the whole model is counted as one (its parameters all train, ZeRO partitions them)
        backbone = model.get_submodule(path) if path else model
        targets = lora_targets_of(backbone)
        counts = count_params(backbone, targets, mode.lora[0] if mode.lora else None)
        head_params = sum(p.numel() for p in model.parameters()) - counts["total"]
        run_mode = dataclasses.replace(mode, lora=(*mode.lora[:3], tuple(targets))) if mode.lora else mode
        fake = FakeTensorMode()
        with fake:
            prepare_for_trace(meta_to_fake_(model), run_mode, backbone=backbone)
        result = _trace_with_loss(exp, model, shape, mode, fake)
        return {**result, "counts": counts, "head_params": head_params,
                "largest_layer": max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                                     default=0)}

    return plan_cache.cached(spec, compute)


def combine(backbone: dict, head: dict, keep_grads: bool, head_grad_bytes: int) -> dict:
    """Backbone and head traced apart → the step's peak, at the higher of two moments: the head's own peak on
    top of the backbone's saved activations (end of forward, head backward), and the backbone's backward peak
    once the head is done (with `keep_grads`, the head's parameter gradients stay until the optimizer step)."""
    key = "peak_with_grads" if keep_grads else "peak"
    bb, hd = backbone[key], head[key]
    during_head = dict(grads=hd["grads"], activations=backbone["after_forward"]["activations"] + hd["activations"],
                       temporaries=hd["temporaries"])
    during_backbone = dict(grads=bb["grads"] + (head_grad_bytes if keep_grads else 0),
                           activations=bb["activations"], temporaries=bb["temporaries"])
    peak = max(during_head, during_backbone, key=lambda d: sum(d.values()))
    return {"peak": peak, "flops": backbone["flops"] + head["flops"],
            "buffers": backbone["peak"]["buffers"] + head["peak"]["buffers"]}
