"""Losses, post-processing and metrics per task, against small hand-checked examples."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from trainer.config import TaskConfig
from trainer.errors import ConfigError
from trainer.tasks import HUBER_DELTA, MetricSuite, build_loss, postprocess

# 2x4 tile; -1 is ignored. Valid (target, pred) pairs: (0,0) x2, (0,1), (1,1) x3, (1,0).
TARGET = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, -1]]])
PRED = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 0]]])


def logits_for(labels: torch.Tensor, k: int = 2) -> torch.Tensor:
    return F.one_hot(labels.clamp_min(0), k).permute(0, 3, 1, 2).float() * 4 - 2


def test_segmentation_metrics_hand_checked():
    m = MetricSuite(TaskConfig(name="segmentation", num_classes=2, ignore_index=-1))
    m.update(logits_for(PRED), TARGET)
    out = m.compute()
    # class 0: TP 2, FP 1, FN 1 → IoU 2/4, F1 4/6; class 1: TP 3, FP 1, FN 1 → IoU 3/5, F1 6/8.
    expect = {"miou": (0.5 + 0.6) / 2, "accuracy": 5 / 7, "f1_class_0": 4 / 6, "f1_class_1": 6 / 8,
              "precision_class_0": 2 / 3, "recall_class_0": 2 / 3, "precision_class_1": 3 / 4, "recall_class_1": 3 / 4}
    assert out == pytest.approx(expect)
    # Two updates accumulate like one; reset forgets.
    m.reset()
    m.update(PRED[:, :1], TARGET[:, :1])
    m.update(PRED[:, 1:], TARGET[:, 1:])
    assert m.compute() == pytest.approx(expect)
    m.reset()
    m.update(TARGET.clamp_min(0), TARGET)
    assert m.compute()["miou"] == pytest.approx(1.0)


def test_change_detection_metrics_hand_checked():
    m = MetricSuite(TaskConfig(name="change_detection", num_classes=2, ignore_index=-1))
    m.update(logits_for(PRED), TARGET)
    # change class: TP 3, FP 1, FN 1.
    assert m.compute() == pytest.approx({"f1": 0.75, "iou": 0.6, "precision": 0.75, "recall": 0.75})
    m.reset()
    m.update(torch.where(PRED == 1, 3.0, -3.0)[:, None], TARGET)  # one logit channel: change where > 0
    assert m.compute()["iou"] == pytest.approx(0.6)


def test_regression_metrics_skip_nan_targets():
    m = MetricSuite(TaskConfig(name="regression", loss="mse"))
    target = torch.tensor([[[0.0, 0.5], [1.0, float("nan")]]])
    pred = torch.tensor([[[[0.1, 0.5], [0.7, 0.9]]]])  # [B,1,H,W] is accepted too
    m.update(pred, target)
    # errors 0.1, 0, -0.3: MSE 0.1/3; MAE 0.4/3; SS_res 0.1, SS_tot 0.5 → R2 0.8.
    assert m.compute() == pytest.approx({"rmse": math.sqrt(0.1 / 3), "mae": 0.4 / 3, "r2": 0.8})
    m.reset()
    m.update(pred, torch.full_like(target, float("nan")))
    assert all(math.isnan(v) for v in m.compute().values())


def test_metrics_do_not_sync_on_compute():
    for name in ("segmentation", "regression", "change_detection"):
        m = MetricSuite(TaskConfig(name=name, loss="mse" if name == "regression" else "ce"))
        assert all(metric.sync_on_compute is False for metric in m.metrics.values())


def test_cross_entropy_ignores_and_weights():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = -1
    loss = build_loss(TaskConfig(num_classes=3, ignore_index=-1, loss="ce"))(pred, target)
    assert loss == pytest.approx(F.cross_entropy(pred, target, ignore_index=-1).item(), rel=1e-6)
    w = [1.0, 2.0, 0.5]
    weighted = build_loss(TaskConfig(num_classes=3, ignore_index=-1, loss="ce", class_weights=w))(pred, target)
    assert weighted == pytest.approx(F.cross_entropy(pred, target, torch.tensor(w), ignore_index=-1).item(), rel=1e-6)


def test_fully_ignored_batch_gives_zero_loss_and_finite_grads():
    pred = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = build_loss(TaskConfig(loss="ce", ignore_index=255))(pred, torch.full((1, 3, 3), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_dice_focal_match_terratorch_choice():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))
    target[1, 2] = -1
    task = dict(num_classes=2, ignore_index=-1)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=-1)(pred, target)
    focal = smp.losses.FocalLoss("multiclass", ignore_index=-1, normalized=True)(pred, target)
    assert build_loss(TaskConfig(loss="dice", **task))(pred, target) == pytest.approx(dice.item())
    assert build_loss(TaskConfig(loss="focal", **task))(pred, target) == pytest.approx(focal.item())
    ce = F.cross_entropy(pred, target, ignore_index=-1)
    assert build_loss(TaskConfig(loss="ce_dice", **task))(pred, target) == pytest.approx((ce + dice).item())


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
def test_regression_losses_are_masked(kind):
    pred = torch.tensor([[[0.2, 0.9], [0.4, 0.5]]], requires_grad=True)
    target = torch.tensor([[[0.0, 1.0], [0.4, float("nan")]]])
    loss = build_loss(TaskConfig(name="regression", loss=kind))(pred[:, None], target)  # [B,1,H,W] accepted
    p, t = pred[~torch.isnan(target)], target[~torch.isnan(target)]
    ref = {"mse": F.mse_loss(p, t), "l1": F.l1_loss(p, t), "huber": F.huber_loss(p, t, delta=HUBER_DELTA)}[kind]
    assert loss.item() == pytest.approx(ref.item())
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 1, 1] == 0


def test_regression_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ"):
        build_loss(TaskConfig(name="regression", loss="mse"))(torch.rand(2, 4, 4), torch.rand(2, 1, 4, 4))


def test_postprocess_bounds_regression_and_unwraps_model_output():
    reg = TaskConfig(name="regression", loss="l1")
    out = postprocess(reg, SimpleNamespace(output=torch.tensor([[[[-50.0, 0.0, 50.0]]]])))
    assert out.shape == (1, 1, 3) and out.min() >= 0 and out.max() <= 1 and out[0, 0, 1] == 0.5
    logits = torch.randn(1, 2, 3, 3)
    assert postprocess(TaskConfig(), logits) is logits
    with pytest.raises(ValueError, match="1 channel"):
        postprocess(reg, torch.randn(1, 2, 3, 3))


def test_loss_task_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="task.loss='ce'.*regression"):
        build_loss(TaskConfig(name="regression", loss="ce"))
    with pytest.raises(ConfigError, match="task.loss='mse'.*segmentation"):
        build_loss(TaskConfig(name="segmentation", loss="mse"))
    with pytest.raises(ConfigError, match="task.class_weights.*'focal'"):
        build_loss(TaskConfig(loss="focal", class_weights=[1.0, 3.0]))
