"""Per-task output post-processing, losses and metrics.

The loop does: `pred = postprocess(task, model(x))`, `loss_fn(pred, mask)`, and on gathered tensors
`metrics.update(pred, mask)`. Shapes:
- segmentation / change_detection: pred = logits [B, K, H, W]; mask int64 [B, H, W] with `task.ignore_index`.
- regression: pred = coherence in [0, 1], [B, H, W] (the sigmoid lives in `postprocess`); mask float32
  [B, H, W] with NaN where invalid.

Dice and focal are segmentation_models_pytorch's, exactly as TerraTorch's segmentation task builds them,
so a loss value here matches `terratorch fit`; importing them from `terratorch.tasks` would cost ~18 s.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import TaskConfig
from trainer.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]
CLASSIFICATION_LOSSES = ("ce", "dice", "ce_dice", "focal")
REGRESSION_LOSSES = ("mse", "l1", "huber")
# Targets live in [0, 1]: torch's default delta of 1.0 would make Huber exactly half the MSE.
HUBER_DELTA = 0.1


def postprocess(task: TaskConfig, raw_output: Any) -> Tensor:
    """Model output → what losses and metrics take. TerraTorch models return `ModelOutput(output=...)`."""
    out = getattr(raw_output, "output", raw_output)
    if task.name != "regression":
        return out
    if out.dim() == 4:
        if out.shape[1] != 1:
            raise ValueError(f"regression head must output 1 channel, got shape {tuple(out.shape)}")
        out = out[:, 0]
    return torch.sigmoid(out)


def _cross_entropy(pred: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    # torch's "mean" divides by the (weighted) count of valid pixels and returns NaN when a batch is all
    # ignored (a tile fully under nodata). Same mean, but 0 with zero gradient then, and no host sync.
    w = None if weight is None else weight.to(pred.device, pred.dtype)
    total = F.cross_entropy(pred, target, weight=w, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    if w is None:
        denom = valid.sum().to(pred.dtype)
    else:
        denom = (w[torch.where(valid, target, 0)] * valid).sum()
    return total / denom.clamp_min(torch.finfo(pred.dtype).eps)


def _masked_regression(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.shape != target.shape:
        # Broadcasting [B,1,H,W] against [B,H,W] would silently compare every pair of samples.
        raise ValueError(f"regression pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    valid = ~torch.isnan(target)
    safe = torch.where(valid, target, torch.zeros_like(target))
    if kind == "mse":
        err = F.mse_loss(pred, safe, reduction="none")
    elif kind == "l1":
        err = F.l1_loss(pred, safe, reduction="none")
    else:
        err = F.huber_loss(pred, safe, reduction="none", delta=HUBER_DELTA)
    # where() rather than multiply: gradients of masked pixels are exactly zero.
    return torch.where(valid, err, torch.zeros_like(err)).sum() / valid.sum().clamp_min(1)


def build_loss(task: TaskConfig) -> LossFn:
    """`loss_fn(pred, target) -> scalar` for `task.loss`; pred as `postprocess` returns it."""
    if task.name == "regression":
        if task.loss not in REGRESSION_LOSSES:
            raise ConfigError(f"task.loss={task.loss!r} is a classification loss but task.name is regression: "
                              f"use one of {', '.join(REGRESSION_LOSSES)}")

        def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
            return _masked_regression(pred, target, task.loss)

        return regression_loss
    if task.loss not in CLASSIFICATION_LOSSES:
        raise ConfigError(f"task.loss={task.loss!r} is a regression loss but task.name is {task.name}: "
                          f"use one of {', '.join(CLASSIFICATION_LOSSES)}")
    if task.class_weights is not None and task.loss in ("dice", "focal"):
        raise ConfigError(f"task.class_weights weigh the cross-entropy term, but task.loss={task.loss!r} has none "
                          "(TerraTorch's dice/focal take no class weights): use ce or ce_dice, or drop the weights")
    weight = torch.tensor(task.class_weights, dtype=torch.float32) if task.class_weights else None

    def ce(pred: Tensor, target: Tensor) -> Tensor:
        return _cross_entropy(pred, target, weight, task.ignore_index)

    if task.loss == "ce":
        return ce
    import segmentation_models_pytorch as smp  # ~3 s: only when dice or focal is asked for

    if task.loss == "focal":
        return smp.losses.FocalLoss("multiclass", ignore_index=task.ignore_index, normalized=True)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=task.ignore_index)
    if task.loss == "dice":
        return dice

    def ce_dice(pred: Tensor, target: Tensor) -> Tensor:
        # Unweighted sum, as TerraTorch's CombinedLoss does for `loss: [ce, dice]`.
        return ce(pred, target) + dice(pred, target)

    return ce_dice


def _labels(pred: Tensor) -> Tensor:
    """Logits [B,K,H,W] → class ids [B,H,W]; a single logit channel means change where logit > 0."""
    if pred.is_floating_point():
        return pred.argmax(1) if pred.shape[1] > 1 else (pred[:, 0] > 0).long()
    return pred


class MetricSuite:
    """torchmetrics per task, fed already-gathered tensors (so no sync of their own on compute).

    segmentation: miou, accuracy (pixel), f1/precision/recall_class_<i>;
    change_detection: f1, iou, precision, recall of the change class (1);
    regression: rmse, mae, r2 over pixels with a non-NaN target.
    """

    def __init__(self, task: TaskConfig):
        from torchmetrics import MetricCollection, classification as C, regression as R

        self.task = task
        kw: dict[str, Any] = {"sync_on_compute": False}
        if task.name == "regression":
            metrics = {"rmse": R.MeanSquaredError(squared=False, **kw), "mae": R.MeanAbsoluteError(**kw),
                       "r2": R.R2Score(**kw)}
        elif task.name == "change_detection":
            kw["ignore_index"] = task.ignore_index
            metrics = {"f1": C.BinaryF1Score(**kw), "iou": C.BinaryJaccardIndex(**kw),
                       "precision": C.BinaryPrecision(**kw), "recall": C.BinaryRecall(**kw)}
        else:
            kw.update(num_classes=task.num_classes, ignore_index=task.ignore_index)
            metrics = {"miou": C.MulticlassJaccardIndex(average="macro", **kw),
                       "accuracy": C.MulticlassAccuracy(average="micro", **kw),
                       "f1": C.MulticlassF1Score(average="none", **kw),
                       "precision": C.MulticlassPrecision(average="none", **kw),
                       "recall": C.MulticlassRecall(average="none", **kw)}
        self.metrics = MetricCollection(metrics)
        self._device = torch.device("cpu")
        self._count = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if self._device != pred.device:
            self.metrics.to(pred.device)
            self._device = pred.device
        if self.task.name == "regression":
            if pred.dim() == 4 and pred.shape[1] == 1:
                pred = pred[:, 0]
            valid = ~torch.isnan(target)
            # Boolean indexing has a data-dependent shape: a host sync on GPU, acceptable once per eval batch.
            pred, target = pred[valid].float(), target[valid].float()
            if target.numel() == 0:
                return
        else:
            pred = _labels(pred)
        self.metrics.update(pred, target)
        self._count += int(target.numel())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if self.task.name == "regression" and self._count < (2 if name == "r2" else 1):
                # R2 needs two valid pixels, the errors one: report "no data" rather than raise mid-run.
                out[name] = float("nan")
                continue
            value = metric.compute()
            if value.numel() == 1:
                out[name] = float(value)
            else:
                out.update({f"{name}_class_{i}": float(v) for i, v in enumerate(value.tolist())})
        return out

    def reset(self) -> None:
        self.metrics.reset()
        self._count = 0
