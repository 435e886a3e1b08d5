"""What terrascale registers into TerraTorch's registries, and the keyword arguments it hands TerraTorch's
`EncoderDecoderFactory` for an experiment. Below everything that builds a model or a task (models, tasks,
terratorch_task, the planner's builders); TerraTorch itself is imported by the callers, lazily.
"""
from __future__ import annotations

from typing import Any

from trainer.config import Experiment


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
    if task.kind.continuous:
        kwargs["num_outputs"] = 1
        # coherence lives in [0, 1]: the head ends in a sigmoid (a user's head_kwargs.final_act wins)
        kwargs.setdefault("head_final_act", "torch.nn.Sigmoid")
    else:
        kwargs["num_classes"] = task.num_classes
    return kwargs
