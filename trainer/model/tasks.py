"""Every experiment trains a TerraTorch task: the native schema is a friendlier way to write one.

`build_task(exp, spec)` turns the native `task` / `model` sections into TerraTorch's own task object, built the way
`terratorch fit` builds a file's `model:` section (a `terratorch fit` file goes through its CLI instead,
trainer.model.terratorch_task): its model comes from TerraTorch's EncoderDecoderFactory (change detection: from
`TemporalEncoderDecoderFactory`, registered into TerraTorch's factory registry, trainer.model.temporal), its
criterion from TerraTorch's loss table (names, lists, weighted dicts, ignore_index, class weights), its validation
metrics from the task. The loop then runs the task's loss handler and metrics for both formats
(trainer.model.terratorch_task.TaskSteps / TaskMetrics). What TerraTorch does not have lives here as task subclasses:

- `SegmentationTask`: with cross-entropy, a batch wholly under nodata (every pixel `ignore_index`) gives a loss of 0
  with zero gradients, where torch's mean is NaN and would poison the weights; any other batch gives TerraTorch's
  value. (segmentation_models_pytorch's dice and lovasz fail on such a batch, in TerraTorch as here.)
- `ChangeDetectionTask`: the metrics of the change class (1): F1_Score, IoU, Precision, Recall.
- `CoherenceRegressionTask`: InSAR coherence in [0, 1]: a sigmoid as the head's final activation, NaN targets are
  invalid pixels (TerraTorch's loss wrapper masks `ignore_index`, so NaN becomes that value before the loss).

Native loss names are TerraTorch's (`ce`, `dice`, `focal`, `jaccard`, `lovasz`; `mse`, `rmse`, `mae`, `huber`),
a list or a weighted dict of them, plus two spellings kept from earlier releases: `ce_dice` = `[ce, dice]` and
`l1` = `mae`. Native `huber` keeps its delta of 0.1 (targets live in [0, 1], where torch's default of 1.0 is
exactly half the MSE): TerraTorch's `custom_loss` path with `torch.nn.HuberLoss(delta=0.1)`.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from trainer.config import REGRESSION, SEGMENTATION, Experiment, TaskConfig, TaskKind, loss_names
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

HUBER_DELTA = 0.1


def terratorch_loss(task: TaskConfig) -> tuple[Any, dict]:
    """(TerraTorch's `loss` init arg, the extra init args it needs) for the native `task.loss`."""
    if isinstance(task.loss, dict):
        loss: Any = {}
        for name, weight in task.loss.items():
            loss.update({n: weight for n in loss_names(name)})
    else:
        names = loss_names(task.loss)
        loss = names[0] if isinstance(task.loss, str) and len(names) == 1 else names
    if task.kind.continuous and loss == "huber":
        return "torch.nn.HuberLoss", {"custom_loss": True,
                                       "custom_loss_kwargs": {"delta": HUBER_DELTA, "reduction": "none"}}
    return loss, {}


class SafeCrossEntropyLoss(nn.CrossEntropyLoss):
    """TerraTorch's cross-entropy (torch's, weighted mean over valid pixels), except that a batch with no valid
    pixel gives 0 and zero gradients instead of NaN; no host sync either way."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(pred.device, pred.dtype)
        total = nn.functional.cross_entropy(pred, target, weight=w, ignore_index=self.ignore_index, reduction="sum")
        valid = target != self.ignore_index
        denom = valid.sum().to(pred.dtype) if w is None else (w[torch.where(valid, target, 0)] * valid).sum()
        return total / denom.clamp_min(torch.finfo(pred.dtype).eps)


def _safe_cross_entropy(criterion: nn.Module) -> nn.Module:
    if type(criterion) is nn.CrossEntropyLoss:
        safe = SafeCrossEntropyLoss(weight=criterion.weight, ignore_index=criterion.ignore_index)
        return safe
    for name, child in list(criterion.named_children()):  # TerraTorch's CombinedLoss holds its parts as children
        setattr(criterion, name, _safe_cross_entropy(child))
    if isinstance(getattr(criterion, "losses", None), dict):
        criterion.losses = {k: _safe_cross_entropy(v) for k, v in criterion.losses.items()}
    return criterion


class NanAsIgnored(nn.Module):
    """Invalid coherence pixels are NaN in terrascale's data; TerraTorch's regression losses mask `ignore_index`."""

    def __init__(self, criterion: nn.Module, ignore_index: float):
        super().__init__()
        self.criterion, self.ignore_index = criterion, ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:  # broadcasting [B,1,H,W] against [B,H,W] would compare every pair
            raise ValueError(f"regression pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        return self.criterion(pred, torch.where(torch.isnan(target), float(self.ignore_index), target))


def terrascale_criterion(kind: TaskKind, criterion: nn.Module, ignore_index) -> nn.Module:
    """What terrascale adds to the criterion TerraTorch's task built: NaN targets as ignored (regression), an
    all-nodata batch's cross-entropy 0 (segmentation, change detection)."""
    if kind.continuous:
        return NanAsIgnored(criterion, ignore_index)
    return _safe_cross_entropy(criterion)


def _task_classes():
    """terrascale's TerraTorch task subclasses (defined on first use: importing terratorch.tasks costs ~15 s)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from terratorch.tasks import PixelwiseRegressionTask, SemanticSegmentationTask
    from torchmetrics import MetricCollection, classification as C

    class SegmentationTask(SemanticSegmentationTask):
        __doc__ = "TerraTorch's SemanticSegmentationTask; an all-nodata batch gives loss 0 (trainer.model.tasks)."

        def configure_losses(self) -> None:
            super().configure_losses()
            self.criterion = terrascale_criterion(SEGMENTATION, self.criterion, self.hparams["ignore_index"])

    class ChangeDetectionTask(SegmentationTask):
        __doc__ = "Segmentation of change (class 1) between dates; metrics of the change class (trainer.model.tasks)."

        def configure_metrics(self) -> None:
            kw = {"ignore_index": self.hparams["ignore_index"]}
            metrics = MetricCollection({"F1_Score": C.BinaryF1Score(**kw), "IoU": C.BinaryJaccardIndex(**kw),
                                        "Precision": C.BinaryPrecision(**kw), "Recall": C.BinaryRecall(**kw)})
            self.train_metrics = metrics.clone(prefix="train/")
            self.val_metrics = metrics.clone(prefix="val/")
            self.test_metrics = nn.ModuleList([metrics.clone(prefix="test/")])

    class CoherenceRegressionTask(PixelwiseRegressionTask):
        __doc__ = "TerraTorch's PixelwiseRegressionTask, targets in [0, 1], NaN where invalid (trainer.model.tasks)."

        def configure_losses(self) -> None:
            super().configure_losses()
            self.criterion = terrascale_criterion(REGRESSION, self.criterion, self.hparams["ignore_index"])

    _CLASSES = {c.__name__: c for c in (SegmentationTask, ChangeDetectionTask, CoherenceRegressionTask)}
    return _CLASSES


_CLASSES = None


def task_class(kind: TaskKind):
    """terrascale's TerraTorch task class for `kind` (its `task_class`; imports TerraTorch)."""
    return _task_classes()[kind.task_class]


def terratorch_task_class(kind: TaskKind):
    """TerraTorch's own task class for `kind` (its `terratorch_task`, in terratorch.tasks; imports TerraTorch)."""
    import terratorch.tasks

    return getattr(terratorch.tasks, kind.terratorch_task)


def task_init_args(exp: Experiment, model_args: dict[str, Any]) -> dict[str, Any]:
    """The task's init args (what a `terratorch fit` file's `model.init_args` would say) for a native experiment."""
    task = exp.task
    loss, extra = terratorch_loss(task)
    args: dict[str, Any] = {"model_factory": task.kind.factory, "model_args": model_args, "loss": loss,
                            "ignore_index": task.ignore_index, "freeze_backbone": exp.model.freeze_backbone,
                            "plot_on_val": False, **extra}
    if task.kind.classes:
        args["class_weights"] = task.class_weights
    return args


def criterion(task: TaskConfig) -> nn.Module:
    """The criterion the native task's TerraTorch task builds, without building a model (planner checks, tests):
    TerraTorch's own `configure_losses` run on the init args alone."""
    exp = SimpleNamespace(task=task, model=SimpleNamespace(freeze_backbone=False))
    args = task_init_args(exp, {})
    holder = SimpleNamespace(hparams={"class_weights": None, "custom_loss": False, "custom_loss_kwargs": None, **args})
    terratorch_task_class(task.kind).configure_losses(holder)
    return terrascale_criterion(task.kind, holder.criterion, task.ignore_index)


def build_task(exp: Experiment, spec=None):
    """The TerraTorch task of a native experiment, its model built by the factory (`spec`, a
    trainer.backbones.stream.LoadSpec: how a `pretrained_path` checkpoint is placed; None: fp32 on the CPU)."""
    from terratorch.registry import BACKBONE_REGISTRY

    from trainer.backbones.stream import LoadSpec, loading_spec
    from trainer.model.registry import factory_kwargs, register_ours

    ours = register_ours()
    if exp.model.backbone not in BACKBONE_REGISTRY:
        raise ConfigError([f"model.backbone: {exp.model.backbone!r} is not in TerraTorch's backbone registry "
                           "(check the spelling; e.g. prithvi_eo_tiny, prithvi_eo_v2_300, terramind_v1_base, "
                           f"or one of terrascale's: {', '.join(sorted(ours)) or 'none installed'})"])
    model_args = {"backbone": exp.model.backbone, "decoder": exp.model.decoder,
                  "necks": [dict(n) for n in exp.model.necks] or None, **factory_kwargs(exp, ours)}
    if exp.task.kind.temporal:
        model_args.update(fusion=exp.task.date_fusion, num_dates=exp.task.dates)
    with loading_spec(spec or LoadSpec()):
        task = task_class(exp.task.kind)(**task_init_args(exp, model_args))
    model = task.model
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s + %s (%s): %.2fM parameters, %.2fM trainable", exp.model.backbone, exp.model.decoder,
             type(task).__name__, n_all / 1e6, n_train / 1e6)
    return task


def loss_fn(task: TaskConfig):
    """`(pred, target) -> total loss` of `criterion(task)` (TerraTorch's CombinedLoss returns its parts too)."""
    crit = criterion(task)

    def total(pred: Tensor, target: Tensor) -> Tensor:
        out = crit(pred, target)
        return out["loss"] if isinstance(out, dict) else out

    return total
