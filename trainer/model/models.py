"""Build the TerraTorch encoder-decoder for an experiment, then apply the memory profile to it.

TerraTorch is imported here, lazily: importing it costs 11-17 s, which the planner's fast path and
`--help` must not pay.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from trainer.config import Experiment
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

# TerraTorch's factory task name for each of our tasks.
FACTORY_TASK = {"segmentation": "segmentation", "change_detection": "segmentation", "regression": "regression"}


def register_ours() -> set[str]:
    """Register terrascale's backbones and model factories into TerraTorch's registries; returns the backbones."""
    from trainer.backbones import register_all
    from trainer.model.temporal import register_factory

    register_factory()
    return set(register_all())


def factory_kwargs(exp: Experiment, ours: set[str]) -> dict[str, Any]:
    m = exp.model
    kwargs: dict[str, Any] = {f"backbone_{k}": v for k, v in m.backbone_kwargs.items()}
    if m.pretrained_path:
        if m.backbone in ours:
            kwargs["backbone_pretrained_path"] = m.pretrained_path
        else:  # TerraTorch's own backbones load a local file through ckpt_path
            kwargs["backbone_pretrained"] = True
            kwargs["backbone_ckpt_path"] = m.pretrained_path
    elif m.backbone not in ours:
        kwargs.setdefault("backbone_pretrained", False)
    kwargs.update({f"decoder_{k}": v for k, v in m.decoder_kwargs.items()})
    kwargs.update({f"head_{k}": v for k, v in m.head_kwargs.items()})
    task = exp.task
    if task.name == "regression":
        kwargs["num_outputs"] = 1
        # coherence lives in [0, 1]: the head ends in a sigmoid (a user's head_kwargs.final_act wins)
        kwargs.setdefault("head_final_act", "torch.nn.Sigmoid")
    else:
        kwargs["num_classes"] = task.num_classes
    return kwargs


def build_model(exp: Experiment, spec=None) -> nn.Module:
    """The experiment's model as its TerraTorch task builds it (a `terratorch fit` file: its task; native: the task
    trainer.model.tasks.build_task makes of it). `spec` (trainer.backbones.stream.LoadSpec): how a `pretrained_path`
    checkpoint is placed (dtype, device, quantization on arrival, ZeRO-3 partitions); None loads fp32 on the CPU."""
    if exp.terratorch is not None:  # a `terratorch fit` file: its task's model, built by TerraTorch
        from trainer.model.terratorch_task import build_task_model

        return build_task_model(exp)
    from trainer.model.tasks import build_task

    return build_task(exp, spec).model


def load_report(model: nn.Module):
    """The backbone's checkpoint LoadReport, when one was loaded (ours: trainer.backbones.loading.LoadReport)."""
    encoder = getattr(model, "encoder", None)
    for m in ([] if encoder is None else encoder.modules()):
        if getattr(m, "load_report", None) is not None:
            return m.load_report
    return None


def model_output(out: Any) -> torch.Tensor:
    """TerraTorch models return a ModelOutput; plain modules a tensor."""
    return out.output if hasattr(out, "output") else out
