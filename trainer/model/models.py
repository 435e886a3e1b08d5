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
from trainer.model.registry import factory_kwargs, register_ours  # noqa: F401  (public here)

log = logging.getLogger(__name__)


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
