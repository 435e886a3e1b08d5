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
_FACTORY_TASK = {"segmentation": "segmentation", "change_detection": "segmentation", "regression": "regression"}


def _register_ours() -> set[str]:
    """Register terrascale's backbones into TerraTorch's registry; returns their names."""
    from trainer.backbones import register_all

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
    else:
        kwargs["num_classes"] = task.num_classes
    return kwargs


def build_model(exp: Experiment, spec=None) -> nn.Module:
    """`spec` (trainer.backbones.stream.LoadSpec): how a `pretrained_path` checkpoint is placed (dtype, device,
    quantization on arrival, ZeRO-3 partitions); None loads in fp32 on the CPU."""
    if exp.terratorch is not None:  # a `terratorch fit` file: its task's model, built by TerraTorch
        from trainer.terratorch_task import build_task_model

        return build_task_model(exp)
    from terratorch.models import EncoderDecoderFactory
    from terratorch.registry import BACKBONE_REGISTRY

    from trainer.backbones.stream import LoadSpec, loading_spec

    ours = _register_ours()
    if exp.model.backbone not in BACKBONE_REGISTRY:
        raise ConfigError([f"model.backbone: {exp.model.backbone!r} is not in TerraTorch's backbone registry "
                           "(check the spelling; e.g. prithvi_eo_tiny, prithvi_eo_v2_300, terramind_v1_base, "
                           f"or one of terrascale's: {', '.join(sorted(ours)) or 'none installed'})"])
    kwargs = factory_kwargs(exp, ours)
    necks = [dict(n) for n in exp.model.necks] or None
    backbone: str | nn.Module = exp.model.backbone
    if exp.task.name == "change_detection":  # one encoder shared by every date, features fused (trainer.temporal)
        from trainer.temporal import temporal_backbone

        backbone, kwargs, necks = temporal_backbone(exp, kwargs, necks)
    with loading_spec(spec or LoadSpec()):
        model = EncoderDecoderFactory().build_model(
            task=_FACTORY_TASK[exp.task.name], backbone=backbone, decoder=exp.model.decoder, necks=necks, **kwargs)
    if exp.model.freeze_backbone:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s + %s: %.2fM parameters, %.2fM trainable", exp.model.backbone, exp.model.decoder,
             n_all / 1e6, n_train / 1e6)
    return model


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
