"""The task kinds (trainer.config.TaskKind) against TerraTorch: every name a kind holds is TerraTorch's (task class,
model factory, factory task, head, losses, default loss, the metric it logs), checked on TerraTorch itself and on
the tasks built from the shipped configs; and the checks catch a kind that says something else.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.config import (CHANGE_DETECTION, CLASSIFICATION_LOSSES, REGRESSION, REGRESSION_LOSSES, SEGMENTATION,
                            TASK_KINDS, TaskConfig, TaskKind, load_experiment)
from trainer.errors import ConfigError
from trainer.model.tasks import build_task, task_class, terratorch_task_class
from trainer.model.terratorch_task import TaskMetrics, primary_metric, task_kind

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"
SHIPPED = {"segmentation": "prithvi_forest", "change_detection": "prithvi_change", "regression": "prithvi_insar"}
TINY = ["model.backbone=prithvi_eo_tiny", "model.backbone_kwargs.img_size=32"]


@pytest.fixture(scope="module")
def built():
    """{name: (experiment, its built TerraTorch task)} for the shipped native configs, on the tiny Prithvi."""
    out = {}
    for name, config in SHIPPED.items():
        exp = load_experiment(CONFIGS / f"{config}.yaml", TINY)
        out[name] = (exp, build_task(exp))
    return out


def _losses_terratorch_names(kind: TaskKind) -> set[str]:
    """The loss names TerraTorch's task for `kind` lists when refusing an unknown one (its init_loss message)."""
    holder = SimpleNamespace(hparams={"loss": "no_such_loss", "ignore_index": None, "class_weights": None,
                                      "custom_loss": False, "custom_loss_kwargs": None})
    with pytest.raises(ValueError) as e:
        terratorch_task_class(kind).configure_losses(holder)
    return set(re.findall(r"'(\w+)'", str(e.value))) - {"no_such_loss"}


def _accepts(kind: TaskKind, loss) -> bool:
    # jaccard refuses any ignore_index in TerraTorch (and terrascale's config refuses jaccard for that reason)
    holder = SimpleNamespace(hparams={"loss": loss, "ignore_index": None, "class_weights": None,
                                      "custom_loss": False, "custom_loss_kwargs": None})
    try:
        terratorch_task_class(kind).configure_losses(holder)
    except (ValueError, RuntimeError):
        return False
    return isinstance(holder.criterion, torch.nn.Module)


def mismatches(kind: TaskKind, exp=None, task=None) -> list[str]:
    """What `kind` says that TerraTorch (and, given, the TerraTorch task built for it) does not."""
    import terratorch.models.heads
    import terratorch.tasks
    from terratorch.models.encoder_decoder_factory import PIXEL_WISE_TASKS
    from terratorch.registry import MODEL_FACTORY_REGISTRY

    from trainer.model.temporal import register_factory

    register_factory()
    out = []
    base = getattr(terratorch.tasks, kind.terratorch_task, None)
    if base is None:
        return [f"terratorch.tasks has no {kind.terratorch_task}"]
    try:
        ours = task_class(kind)
    except KeyError:
        ours = None
    if ours is None or not issubclass(ours, base) or ours.__name__ != kind.task_class:
        out.append(f"task_class {kind.task_class}: not terrascale's subclass of {kind.terratorch_task}")
    if kind.factory not in MODEL_FACTORY_REGISTRY:
        out.append(f"factory {kind.factory} is not in TerraTorch's model factory registry")
    if kind.factory_task not in PIXEL_WISE_TASKS:
        out.append(f"factory_task {kind.factory_task} is not one of TerraTorch's pixel-wise tasks {PIXEL_WISE_TASKS}")
    if not isinstance(getattr(terratorch.models.heads, kind.head, None), type):
        out.append(f"head {kind.head} is not in terratorch.models.heads")
    default = inspect.signature(base.__init__).parameters["loss"].default
    if kind.default_loss != default:
        out.append(f"default_loss {kind.default_loss!r}: TerraTorch's {kind.terratorch_task} defaults to {default!r}")
    if set(kind.losses) != _losses_terratorch_names(kind):
        out.append(f"losses {kind.losses}: TerraTorch's {kind.terratorch_task} names {_losses_terratorch_names(kind)}")
    refused = [n for n in (*kind.losses, list(kind.losses)) if not _accepts(kind, n)]
    if refused:
        out.append(f"TerraTorch's {kind.terratorch_task}.configure_losses refuses {refused}")
    others = {n for k in TASK_KINDS.values() if k.output != kind.output for n in k.losses}
    if any(_accepts(kind, n) for n in others):
        out.append(f"TerraTorch's {kind.terratorch_task} also takes the other output's losses {sorted(others)}")
    if task is None:
        return out
    if type(task).__name__ != kind.task_class or task_kind(task).name != kind.name:
        out.append(f"the built task is a {type(task).__name__}, not the kind's {kind.task_class}")
    if type(task.model.head).__name__ != kind.head:
        out.append(f"the factory's head is {type(task.model.head).__name__}, not {kind.head}")
    if primary_metric(task) != kind.primary_metric:
        out.append(f"primary_metric of the built task is {primary_metric(task)}, not {kind.primary_metric}")
    n, k = 2, exp.task.num_classes
    shape = (n, exp.task.dates, len(exp.model.backbone_kwargs["bands"]), 32, 32)
    x = torch.randn(shape) if kind.temporal else torch.randn(shape).squeeze(1)
    with torch.no_grad():
        logits = task.model.eval()(x).output
    scores = kind.scores(logits)
    if tuple(scores.shape) != (n, kind.out_channels(k), 32, 32):
        out.append(f"scores of the model's output {tuple(logits.shape)} are {tuple(scores.shape)}")
    if kind.classes and not torch.allclose(scores.sum(1), torch.ones(n, 32, 32)):
        out.append("class scores are not probabilities")
    metrics = TaskMetrics(task)
    y = torch.rand(n, 32, 32) if kind.continuous else torch.randint(0, k, (n, 32, 32))
    metrics.update(y + 0.1 if kind.continuous else y, y)
    if kind.primary_metric not in metrics.compute():
        out.append(f"the task logs no {kind.primary_metric}: {sorted(metrics.compute())}")
    return out


def test_one_kind_per_task_name():
    names = typing.get_args(TaskConfig.model_fields["name"].annotation)
    assert tuple(TASK_KINDS) == names == ("segmentation", "regression", "change_detection")
    for name, kind in TASK_KINDS.items():
        assert kind.name == name and TaskConfig(name=name, num_classes=2).kind is kind
    with pytest.raises(dataclasses.FrozenInstanceError):
        SEGMENTATION.default_loss = "dice"


def test_kinds_as_the_config_uses_them():
    assert [k.temporal for k in TASK_KINDS.values()] == [False, False, True]
    assert TaskConfig(name="regression").loss == REGRESSION.default_loss == "mse"
    assert TaskConfig().loss == SEGMENTATION.default_loss == CHANGE_DETECTION.default_loss == "ce"
    assert TaskConfig(name="change_detection").dates == 2 and TaskConfig().dates == 1
    assert SEGMENTATION.losses == CLASSIFICATION_LOSSES and REGRESSION.losses == REGRESSION_LOSSES
    for kind in TASK_KINDS.values():
        for loss in set(kind.losses) - {"jaccard", "rmse"}:  # both refused by the config, with their reasons
            TaskConfig(name=kind.name, loss=loss)
        other = REGRESSION if kind.classes else SEGMENTATION
        with pytest.raises(Exception, match="a regression loss" if kind.classes else "a classification loss"):
            TaskConfig(name=kind.name, loss=other.default_loss)
    assert SEGMENTATION.out_channels(5) == 5 and REGRESSION.out_channels(5) == 1
    assert SEGMENTATION.label_fill(-1) == -1 and REGRESSION.label_fill(-1) != REGRESSION.label_fill(-1)  # NaN
    logits = torch.randn(2, 3, 4, 4)
    assert torch.equal(SEGMENTATION.scores(logits), logits.softmax(dim=1))
    assert REGRESSION.scores(logits[:, 0]).shape == (2, 1, 4, 4) and REGRESSION.scores(logits[:, :1]).shape[1] == 1


def test_a_name_not_in_the_table_still_reads_as_before():
    with pytest.raises(ConfigError, match="task.name"):
        from trainer.config import experiment_from_raw

        experiment_from_raw({"task": {"name": "classification"}}, "test")
    # an unhashable name is a type error of that key, not a crash of the loss default
    with pytest.raises(ConfigError, match="task.name"):
        from trainer.config import experiment_from_raw

        experiment_from_raw({"task": {"name": ["regression"]}}, "test")


@pytest.mark.parametrize("name", list(TASK_KINDS))
def test_kind_matches_terratorch(name, built):
    exp, task = built[name]
    assert exp.task.kind is TASK_KINDS[name]
    assert mismatches(TASK_KINDS[name], exp, task) == []


def test_primary_metrics_are_what_sweeps_lead_with():
    from trainer.sweep.sweep_summary import PRIMARY

    assert {k.primary_metric for k in TASK_KINDS.values()} <= set(PRIMARY)


@pytest.mark.parametrize("name, wrong", [
    ("segmentation", {"default_loss": "dice"}),
    ("regression", {"losses": (*REGRESSION_LOSSES, "ce")}),
    ("regression", {"losses": REGRESSION_LOSSES[:-1]}),
    ("change_detection", {"factory": "NoSuchFactory"}),
    ("change_detection", {"task_class": "SegmentationTask"}),
    ("segmentation", {"head": "RegressionHead"}),
    ("segmentation", {"primary_metric": "F1_Score"}),
    ("regression", {"postprocess": "softmax"}),
    ("regression", {"terratorch_task": "SemanticSegmentationTask"}),
])
def test_a_wrong_kind_is_caught(name, wrong, built):
    exp, task = built[name]
    assert mismatches(dataclasses.replace(TASK_KINDS[name], **wrong), exp, task) != []


def test_terratorch_file_tasks_agree_with_the_kinds():
    # trainer.terratorch_compat cannot import trainer.config (config imports it): its table is checked here
    from trainer.terratorch_compat import TERRATORCH_TASKS

    assert all(TASK_KINDS[name].terratorch_task == cls for cls, name in TERRATORCH_TASKS.items())
    assert set(TERRATORCH_TASKS) == {k.terratorch_task for k in TASK_KINDS.values()}
    assert all(not TASK_KINDS[name].temporal for name in TERRATORCH_TASKS.values())
