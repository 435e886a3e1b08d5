"""The planner on a `terratorch fit` file: `memory.profile: auto` and `terrascale plan --config`.

TerraTorch's CLI class builds the file's task, whatever its model factory (`trainer.model.terratorch_task.instantiate`);
this module hands the planner (`trainer.plan`, which never imports TerraTorch) what only the built objects know:
- the model, as `Builders.full_model`: the file's model section built again by the same CLI class on the meta
  device (no weights, pretrained ones not read), traced whole on fake tensors like every TerraTorch-built model
  (`plan.head.whole_step`);
- where its backbone sits (`terratorch_task.backbone_path`): without one, the profiles that adapt a backbone
  (LoRA, quantization, gradient checkpointing) are refused in the table and never chosen, as the run refuses them;
- the input: the first training batch as the task's model receives it (the datamodule's samples, its collate, its
  `on_after_batch_transfer`), one image tensor [B, C, H, W] or a dict of them (multimodal).
Everything else - the profiles' arithmetic, the 10 % margin, the choice, the table - is the planner's.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from trainer.config import Experiment
from trainer.errors import PlanError


def planning_view(exp: Experiment) -> Experiment:
    """`exp` with what the planner's arithmetic reads from `model` / `optim` taken from the file: the task's
    `freeze_backbone` (no gradients or optimizer states for the backbone) and SGD's one momentum buffer when the
    file's optimizer is SGD (any other optimizer is counted with AdamW's two fp32 moments)."""
    init = exp.terratorch.config["model"].get("init_args") or {}
    optimizer = str((exp.terratorch.config.get("optimizer") or {}).get("class_path", "")).rsplit(".", 1)[-1]
    update: dict[str, Any] = {"model": exp.model.model_copy(update={"freeze_backbone":
                                                                    bool(init.get("freeze_backbone", False))})}
    if optimizer == "SGD":
        update["optim"] = exp.optim.model_copy(update={"name": "sgd"})
    return exp.model_copy(update=update)


def loads_pretrained(exp: Experiment) -> bool:
    """Whether the factory reads pretrained backbone weights (the CPU load peak then holds a checkpoint too)."""
    args = (exp.terratorch.config["model"].get("init_args") or {}).get("model_args") or {}
    return bool(args.get("backbone_pretrained") or args.get("pretrained"))


def label(exp: Experiment, model: torch.nn.Module) -> str:
    args = (exp.terratorch.config["model"].get("init_args") or {}).get("model_args") or {}
    factory = (exp.terratorch.config["model"].get("init_args") or {}).get("model_factory", "?")
    backbone = args.get("backbone")
    return f"{factory} {type(model).__name__}" + (f", backbone {backbone}" if backbone else "")


def batch_shape(built, train_ds, batch_size: int):
    """`plan.workload.InputShape` of the first training batch as the task's model receives it: `batch_size`
    samples collated by the datamodule and passed through its `on_after_batch_transfer` (augmentations that
    crop or resize are seen)."""
    from torch.utils.data import default_collate

    from trainer.model import terratorch_task as T
    from trainer.plan.workload import InputShape

    n = min(batch_size, len(train_ds))
    batch = (T.collate_fn(built) or default_collate)([train_ds[i] for i in range(n)])
    x, _, rest = T.TaskSteps(built.task, built.datamodule).batch(batch, "train")
    extra = sorted(k for k, v in rest.items() if isinstance(v, torch.Tensor))
    if extra:
        raise PlanError(f"memory.profile auto: the batch also hands the model {', '.join(extra)}, which the "
                        "planner's trace does not feed; name a profile (full, lora, zero3_offload, ...)")
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return InputShape(batch_size, int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in x.values()) and \
            len({tuple(v.shape[2:]) for v in x.values()}) == 1:
        mods = tuple((str(k), int(v.shape[1])) for k, v in x.items())
        h, w = next(iter(x.values())).shape[2:]
        return InputShape(batch_size, sum(c for _, c in mods), int(h), int(w), modalities=mods)
    shapes = ({k: list(v.shape) for k, v in x.items()} if isinstance(x, dict)
              else list(getattr(x, "shape", [type(x).__name__])))
    raise PlanError(f"memory.profile auto: the planner traces image batches [B, C, H, W] (or one per modality, "
                    f"same H, W); this datamodule's batch['image'] is {shapes}; name a profile (full, lora, ...)")


def without_pretrained(spec):
    """`spec` (TerraTorchSpec) whose factory reads no pretrained weights: the same architecture, for a build on the
    meta device, where weights would be read for nothing."""
    config = copy.deepcopy(spec.config)
    args = (config["model"].get("init_args") or {}).get("model_args") or {}
    for key in ("backbone_pretrained", "pretrained"):
        if args.get(key):
            args[key] = False
    return spec.model_copy(update={"config": config})


def plan_inputs(exp: Experiment, built, train_ds, batch_size: int) -> dict[str, Any]:
    """`planner.plan_experiment` keywords for the model `built` (trainer.model.terratorch_task.Built) holds.

    The planner traces a build of the same file on the meta device (`head.whole_step` builds under
    `torch.device("meta")`), not a copy of `built`'s model: TerraTorch's backbones hold closures over their own
    module (Prithvi's `forward` is one), which a copy would keep calling on the real weights."""
    from trainer.model import terratorch_task as T
    from trainer.plan.head import Builders

    model = built.task.model
    meta_spec = without_pretrained(exp.terratorch)

    def full_model(_exp):
        return T.instantiate(meta_spec, exp.run.seed, with_data=False).task.model

    def around(_exp, _backbone):  # only catalog backbones are traced apart from their decoder
        raise PlanError("a terratorch file's model is traced whole")

    return {"builders": Builders(full_model=full_model, around=around, backbone_path=T.backbone_path),
            "shape": batch_shape(built, train_ds, batch_size), "label": label(exp, model),
            "no_backbone": T.missing_backbone(model),
            "loads_checkpoint": loads_pretrained(exp)}


def resolve_auto(exp: Experiment, built, train_ds, batch_size: int, resuming: bool):
    """(exp with `memory.profile: auto` replaced by the planner's choice, AutoChoice | None), as
    `trainer.plan.auto.resolve` does for terrascale's own schema."""
    from trainer.plan import auto
    view, choice = auto.resolve(planning_view(exp), resuming,
                                inputs=lambda: plan_inputs(exp, built, train_ds, batch_size))
    if choice is None:
        return exp, None
    return exp.model_copy(update={"memory": view.memory}), choice


def plan_file(exp: Experiment, gpu: int, cpu: int, nvme_path: str | None):
    """`terrascale plan --config <terratorch file>`: TerraTorch builds the file's task and datamodule (as the run
    does: real weights, and pretrained ones when the file asks for them), then every profile is planned."""
    from trainer.model import terratorch_task as T
    from trainer.plan.planner import plan_experiment

    built = T.instantiate(exp.terratorch, exp.run.seed)
    train_ds, _ = T.datasets(built, exp.run.seed)
    batch_size = getattr(built.datamodule, "batch_size", None) or exp.data.batch_size
    return plan_experiment(planning_view(exp), gpu, cpu, nvme_path, **plan_inputs(exp, built, train_ds, batch_size))
