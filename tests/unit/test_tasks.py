"""The native tasks are TerraTorch tasks: their criteria and metrics, against small hand-checked examples.

Built on the tiny Prithvi (one TerraTorch import for the module); the losses come from TerraTorch's own loss table
(`trainer.model.tasks.criterion` runs the task's `configure_losses`), with terrascale's two additions: an all-nodata batch
gives 0 and zero gradients, and NaN coherence targets are invalid pixels.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from trainer.config import TaskConfig, load_experiment
from trainer.errors import ConfigError
from trainer.model.tasks import HUBER_DELTA, build_task, loss_fn as criterion
from trainer.model.terratorch_task import TaskMetrics, primary_metric

# 2x4 tile; -1 is ignored. Valid (target, pred) pairs: (0,0) x2, (0,1), (1,1) x3, (1,0).
TARGET = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, -1]]])
PRED = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 0]]])
TINY = ["model.backbone=prithvi_eo_tiny", "model.backbone_kwargs.img_size=32"]


CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"
SHIPPED = {"segmentation": "prithvi_forest", "change_detection": "prithvi_change", "regression": "prithvi_insar"}


def native(name: str, *extra: str):
    return load_experiment(CONFIGS / f"{SHIPPED[name]}.yaml", [*TINY, *extra])


@pytest.fixture(scope="module")
def tasks():
    return {name: build_task(native(name)) for name in ("segmentation", "change_detection", "regression")}


def test_native_tasks_are_terratorchs(tasks):
    from terratorch.models.pixel_wise_model import PixelWiseModel
    from terratorch.tasks import PixelwiseRegressionTask, SemanticSegmentationTask

    assert isinstance(tasks["segmentation"], SemanticSegmentationTask)
    assert isinstance(tasks["change_detection"], SemanticSegmentationTask)
    assert isinstance(tasks["regression"], PixelwiseRegressionTask)
    assert [primary_metric(tasks[n]) for n in ("segmentation", "change_detection", "regression")] == \
        ["mIoU", "F1_Score", "RMSE"]
    for task in tasks.values():  # built by TerraTorch's factories, not a terrascale copy of them
        assert isinstance(task.model, PixelWiseModel)
    # coherence in [0, 1]: the regression head ends in a sigmoid
    reg = tasks["regression"].model.eval()
    with torch.no_grad():
        bands = len(native("regression").model.backbone_kwargs["bands"])
        out = reg(torch.randn(2, bands, 32, 32) * 50).output
    assert out.shape == (2, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_segmentation_metrics_hand_checked(tasks):
    m = TaskMetrics(tasks["segmentation"])
    m.update(PRED, TARGET)
    out = m.compute()
    # class 0: TP 2, FP 1, FN 1 → IoU 2/4, F1 4/6; class 1: TP 3, FP 1, FN 1 → IoU 3/5, F1 6/8.
    expect = {"mIoU": (0.5 + 0.6) / 2, "Pixel_Accuracy": 5 / 7, "IoU_0": 0.5, "IoU_1": 0.6,
              "F1_Score": (4 / 6 + 6 / 8) / 2}
    assert {k: out[k] for k in expect} == pytest.approx(expect)
    # Two updates accumulate like one; reset forgets.
    m.reset()
    m.update(PRED[:, :1], TARGET[:, :1])
    m.update(PRED[:, 1:], TARGET[:, 1:])
    assert {k: m.compute()[k] for k in expect} == pytest.approx(expect)
    m.reset()
    m.update(TARGET.clamp_min(0), TARGET)
    assert m.compute()["mIoU"] == pytest.approx(1.0)


def test_change_detection_metrics_hand_checked(tasks):
    m = TaskMetrics(tasks["change_detection"])
    m.update(PRED, TARGET)
    # change class: TP 3, FP 1, FN 1.
    assert m.compute() == pytest.approx({"F1_Score": 0.75, "IoU": 0.6, "Precision": 0.75, "Recall": 0.75})


def test_regression_metrics_skip_nan_targets(tasks):
    m = TaskMetrics(tasks["regression"])
    target = torch.tensor([[[0.0, 0.5], [1.0, float("nan")]]])
    pred = torch.tensor([[[0.1, 0.5], [0.7, 0.9]]])
    m.update(pred, target)
    # errors 0.1, 0, -0.3: MSE 0.1/3; MAE 0.4/3; SS_res 0.1, SS_tot 0.5 → R2 0.8.
    assert m.compute() == pytest.approx({"RMSE": math.sqrt(0.1 / 3), "MSE": 0.1 / 3, "MAE": 0.4 / 3,
                                         "R2_Score": 0.8})
    m.reset()
    m.update(pred, torch.full_like(target, float("nan")))  # nothing valid: NaN, not an exception mid-run
    assert all(math.isnan(v) for v in m.compute().values())


def test_metrics_do_not_sync_on_compute(tasks):
    from torchmetrics import Metric

    for task in tasks.values():
        m = TaskMetrics(task)
        assert all(x.sync_on_compute is False for x in m.metrics.modules() if isinstance(x, Metric))


def test_cross_entropy_ignores_and_weights():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = -1
    loss = criterion(TaskConfig(num_classes=3, ignore_index=-1, loss="ce"))(pred, target)
    assert loss == pytest.approx(F.cross_entropy(pred, target, ignore_index=-1).item(), rel=1e-6)
    w = [1.0, 2.0, 0.5]
    weighted = criterion(TaskConfig(num_classes=3, ignore_index=-1, loss="ce", class_weights=w))(pred, target)
    assert weighted == pytest.approx(F.cross_entropy(pred, target, torch.tensor(w), ignore_index=-1).item(), rel=1e-6)


def test_fully_ignored_batch_gives_zero_loss_and_finite_grads():
    for loss in ("ce",):  # (smp's dice/lovasz return empty tensors there, in TerraTorch too)
        pred = torch.randn(1, 2, 3, 3, requires_grad=True)
        value = criterion(TaskConfig(loss=loss, ignore_index=255))(pred, torch.full((1, 3, 3), 255))
        value.backward()
        assert value.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred)), loss


def test_losses_are_terratorchs_names_lists_and_dicts():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))
    target[1, 2] = -1
    task = dict(num_classes=2, ignore_index=-1)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=-1)(pred, target)
    focal = smp.losses.FocalLoss("multiclass", ignore_index=-1, normalized=True)(pred, target)
    lovasz = smp.losses.LovaszLoss("multiclass", ignore_index=-1)(pred, target)
    ce = F.cross_entropy(pred, target, ignore_index=-1)
    assert criterion(TaskConfig(loss="dice", **task))(pred, target) == pytest.approx(dice.item())
    assert criterion(TaskConfig(loss="focal", **task))(pred, target) == pytest.approx(focal.item())
    assert criterion(TaskConfig(loss="ce_dice", **task))(pred, target) == pytest.approx((ce + dice).item())
    assert criterion(TaskConfig(loss=["ce", "lovasz"], **task))(pred, target) == pytest.approx((ce + lovasz).item())
    weighted = criterion(TaskConfig(loss={"ce": 0.7, "dice": 0.3}, **task))(pred, target)
    assert weighted == pytest.approx((0.7 * ce + 0.3 * dice).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["mse", "l1", "mae", "huber"])
def test_regression_losses_are_masked(kind):
    pred = torch.tensor([[[0.2, 0.9], [0.4, 0.5]]], requires_grad=True)
    target = torch.tensor([[[0.0, 1.0], [0.4, float("nan")]]])
    loss = criterion(TaskConfig(name="regression", loss=kind))(pred, target)
    p, t = pred[~torch.isnan(target)], target[~torch.isnan(target)]
    ref = {"mse": F.mse_loss(p, t), "l1": F.l1_loss(p, t), "mae": F.l1_loss(p, t),
           "huber": F.huber_loss(p, t, delta=HUBER_DELTA)}[kind]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 1, 1] == 0


def test_regression_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ"):
        criterion(TaskConfig(name="regression", loss="mse"))(torch.rand(2, 4, 4), torch.rand(2, 1, 4, 4))


@pytest.mark.parametrize("overrides,match", [
    (["task.name=regression", "task.loss=ce"], r"task.loss: 'ce' is a classification loss for task.name=regression"),
    (["task.loss=mse"], r"task.loss: 'mse' is a regression loss for task.name=segmentation"),
    (["task.loss=focal", "task.class_weights=[1.0, 3.0]"], r"task.class_weights.*'focal'"),
    (["task.loss=[ce, hinge]"], r"'hinge' is not a TerraTorch loss"),
    (["task.loss=jaccard"], r"jaccard loss takes no ignore_index"),
    (["task.name=regression", "task.loss=rmse"], r"fourth root of the MSE"),
    (["task.name=regression", "task.loss={huber: 0.5, mse: 0.5}"], r"huber alone"),
])
def test_loss_mistakes_are_config_errors_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(None, overrides)


def test_default_loss_is_terratorchs_per_task():
    # TerraTorch's tasks default to ce (segmentation) and mse (pixelwise regression); so does task.loss
    assert TaskConfig().loss == "ce" and TaskConfig(name="change_detection").loss == "ce"
    assert TaskConfig(name="regression").loss == "mse"
    assert load_experiment(None, ["task.name=regression"]).task.loss == "mse"
