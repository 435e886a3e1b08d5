"""TerraTorch builds, terrascale trains: a `terratorch fit` file instantiated by TerraTorch's own LightningCLI.

`instantiate(spec, seed)` parses `Experiment.terratorch.config` (model / data / optimizer / lr_scheduler, verbatim)
with TerraTorch's CLI class (`terratorch.cli_tools.MyLightningCLI`: jsonargparse, class_path/init_args, short
class names, its registries, `custom_modules_path`), seeded with `seed_everything` as `terratorch fit` seeds it,
and returns the task (its model built by whichever factory the file names, its criterion - names, lists,
weighted dicts, ignore_index, class weights - aux heads and metrics) and the datamodule (its datasets, transforms
and batch augmentation). No Lightning Trainer is built. terrascale then applies the memory profile to
`task.model`, prepares it with Accelerate/DeepSpeed and runs its own loop with the task's pieces:

- `TaskSamples`: the datamodule's dataset, samples as TerraTorch gives them (albumentations seeded per
  (seed, epoch, index), so a resume replays the same augmentations);
- `TaskSteps`: per batch, what the task's `training_step` / `validation_step` do - the datamodule's
  `on_after_batch_transfer` (its `train_aug`/`val_aug`/`aug`), `model(image, **other keys)`, the task's loss
  handler with `task.criterion` and `task.aux_loss`, and the task's `val_metrics`;
- `task_optimizer`: the task's `configure_optimizers()` (the file's `optimizer`/`lr_scheduler` blocks when
  given - LightningCLI attaches them - else the task's `optimizer`/`lr`/`scheduler` init_args), on the
  parameters the profile leaves trainable;
- `LightningSchedule`: the schedulers stepped as Lightning steps them (interval step/epoch, frequency,
  ReduceLROnPlateau on its monitored validation metric).
"""
from __future__ import annotations

import copy
import functools
import logging
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from trainer.config import CHANGE_DETECTION, REGRESSION, SEGMENTATION, TaskKind
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

# where the backbone sits in each TerraTorch model class (EncoderDecoderModel / PixelWiseModel: encoder;
# SMPModelFactory: smp_model.encoder; GenericUnetModelFactory: the whole UNet)
_BACKBONE_PATHS = ("encoder", "smp_model.encoder", "unet_model")


@dataclass
class Built:
    task: Any  # a terratorch.tasks task (a LightningModule)
    datamodule: Any  # a LightningDataModule, or None when built without data


def _cli_class():
    from terratorch.cli_tools import MyLightningCLI

    class BuildOnly(MyLightningCLI):
        """TerraTorch's CLI without a Lightning Trainer: terrascale trains."""

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            return SimpleNamespace()  # MyLightningCLI sets a few predict attributes on it

    return BuildOnly


def _failing_section(exc: BaseException) -> str:
    frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    return "data" if any("/datamodules/" in f or "/datasets/" in f for f in frames) else "model"


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def _parse_error(exc: BaseException, source: str | None) -> ConfigError:
    text = " ".join(str(exc).split())
    if len(text) > 1500:
        text = text[:1500] + " ..."
    return ConfigError([f"TerraTorch's parser refused the file: {text} (fix the key it names; the file must load "
                        "with `terratorch fit -c` too)"], source=source)


_AUX_HEAD = "terratorch.models.model.AuxiliaryHead"


def _typed_aux_heads(args: dict, source: str | None) -> None:
    """TerraTorch's documented aux head form (`model.init_args.aux_heads: [{name, decoder, decoder_args}]`) given to
    1.2.11's parser as `class_path: terratorch.models.model.AuxiliaryHead` entries, in place.

    1.2.11 types `SemanticSegmentationTask.aux_heads` as `list[Any]`, so jsonargparse passes plain dicts through
    unconverted (and cannot resolve the short class name `AuxiliaryHead` there); the factory then reads
    `aux_decoder.decoder_args` of a dict (AttributeError). With the full class_path jsonargparse builds the
    AuxiliaryHead dataclasses, as later TerraTorch (typing it `list[AuxiliaryHead]`) does from the plain dicts;
    PixelwiseRegressionTask's `list[AuxiliaryHead]` takes either form."""
    init = (args.get("model") or {}).get("init_args")
    if not isinstance(init, dict):
        return
    model_args = init.get("model_args")
    if isinstance(model_args, dict) and "aux_decoders" in model_args:
        raise ConfigError(["model.init_args.model_args.aux_decoders: the task hands the factory its own aux_heads as "
                           "aux_decoders (TypeError: multiple values); move the list to model.init_args.aux_heads "
                           "(entries {name, decoder, decoder_args}) and weight each head in model.init_args.aux_loss "
                           "({name: weight})"], source=source)
    heads = init.get("aux_heads")
    if not isinstance(heads, list):
        return
    typed = []
    for head in heads:
        if isinstance(head, dict) and "class_path" not in head:
            head = {"class_path": _AUX_HEAD, "init_args": head}
        elif isinstance(head, dict) and head.get("class_path") == "AuxiliaryHead":
            head = {**head, "class_path": _AUX_HEAD}
        typed.append(head)
    init["aux_heads"] = typed


def instantiate(spec, seed: int, with_data: bool = True) -> Built:
    """TerraTorch's CLI objects for `spec` (trainer.config.TerraTorchSpec), without a Trainer."""
    from trainer.model.registry import register_ours

    register_ours()  # terrascale's own backbones and TemporalEncoderDecoderFactory can be named in a file too
    if spec.custom_modules_path:
        from terratorch.cli_tools import import_custom_modules

        import_custom_modules(spec.custom_modules_path)
    args = copy.deepcopy({k: v for k, v in spec.config.items() if with_data or k != "data"})
    args["seed_everything"] = seed
    _typed_aux_heads(args, spec.source)
    args["trainer"] = {"logger": False, "enable_checkpointing": False}
    from lightning.pytorch.core import LightningDataModule  # noqa: F401  (jsonargparse resolves subclasses)
    from torchgeo.trainers import BaseTask

    cli_cls = _cli_class()
    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI would also look at terrascale's own command line
    try:
        cli = cli_cls(model_class=BaseTask, subclass_mode_model=True, subclass_mode_data=True,
                      seed_everything_default=seed, save_config_callback=None, args=args, run=False,
                      parser_kwargs={"exit_on_error": False})
    except ConfigError:
        raise
    except SystemExit as e:  # jsonargparse reports a bad config by exiting (already printed to stderr)
        raise ConfigError(["TerraTorch's parser refused the file (its message is printed above); fix the key it "
                           "names"], source=spec.source) from e
    except Exception as e:  # noqa: BLE001 - a user's config can fail anywhere inside TerraTorch
        name = type(e).__name__
        if name in ("ArgumentError", "NSKeyError") or "jsonargparse" in type(e).__module__:
            raise _parse_error(e, spec.source) from e
        root = _root_cause(e)
        section = _failing_section(root)
        text = " ".join(str(root).split())[:600]
        raise ConfigError([f"{section}: TerraTorch could not build it: {type(root).__name__}: {text} (check "
                           f"{section}.init_args)"], source=spec.source) from e
    finally:
        sys.argv = argv
    task = cli.model
    # LightningCLI instantiated the file's optimizer block on the parameters the task had then; task_optimizer
    # builds it again once the memory profile has added/replaced some (LoRA adapters, 4-bit weights)
    task.terrascale_rebind_optimizer = functools.partial(cli._add_configure_optimizers_method_to_model, None)
    if not hasattr(task, "train_loss_handler") or not hasattr(task, "criterion"):
        raise ConfigError([f"model.class_path: {type(task).__name__} has no TerraTorch loss handler/criterion; "
                           "terrascale trains terratorch.tasks.SemanticSegmentationTask and PixelwiseRegressionTask"],
                          source=spec.source)
    return Built(task, cli.datamodule if with_data else None)


def check(spec, seed: int) -> list[str]:
    """Parse-only check at load (no model built): the problems TerraTorch's parser finds."""
    from trainer.model.registry import register_ours

    register_ours()
    cli_cls = _cli_class()
    args = copy.deepcopy(spec.config)
    args["seed_everything"] = seed
    try:
        _typed_aux_heads(args, spec.source)
    except ConfigError as e:
        return e.issues
    args["trainer"] = {"logger": False, "enable_checkpointing": False}
    from torchgeo.trainers import BaseTask

    class ParseOnly(cli_cls):
        def instantiate_classes(self) -> None:
            pass

    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        ParseOnly(model_class=BaseTask, subclass_mode_model=True, subclass_mode_data=True,
                  seed_everything_default=seed, save_config_callback=None, args=args, run=False,
                  parser_kwargs={"exit_on_error": False})
    except SystemExit:
        return ["TerraTorch's parser refused the file (its message is printed above); fix the key it names"]
    except Exception as e:  # noqa: BLE001
        return _parse_error(e, None).issues
    finally:
        sys.argv = argv
    return []


def backbone_path(model: nn.Module) -> str | None:
    """Dotted attribute of `model` holding the backbone the memory profile adapts (None: not found)."""
    for path in _BACKBONE_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.Module):
            return path
    return None


def missing_backbone(model: nn.Module) -> str | None:
    """The model's class name when it has no backbone terrascale can find (`backbone_path` is None), else None:
    what `trainer.memory.profiles.no_backbone_refusal` is asked with, by the run and by the planner alike."""
    return None if backbone_path(model) is not None else type(model).__name__


def datasets(built: Built, seed: int) -> tuple[Dataset, Dataset]:
    dm = built.datamodule
    if dm is None:
        raise ConfigError(["data: a terratorch config needs a data section (class_path + init_args)"])
    try:
        dm.setup("fit")
    except Exception as e:  # noqa: BLE001
        raise ConfigError([f"data.init_args: the datamodule {type(dm).__name__} could not set up its datasets: "
                           f"{type(e).__name__}: {e}"]) from e
    train, val = getattr(dm, "train_dataset", None), getattr(dm, "val_dataset", None)
    if train is None or val is None:
        raise ConfigError([f"data.class_path: {type(dm).__name__} has no train_dataset/val_dataset after "
                           "setup('fit'); terrascale trains from those"])
    return TaskSamples(train, seed), TaskSamples(val, seed)


def collate_fn(built: Built):
    return getattr(built.datamodule, "collate_fn", None)


class TaskSamples(Dataset):
    """The datamodule's dataset as TerraTorch yields it (minus `filename`), augmentations seeded per
    (seed, epoch, index); TerraTorch's batch augmentation runs later, on the batch (`TaskSteps`)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from trainer.data.geotiff import item_rng

        seed = int(item_rng(self.seed, self.epoch, index).integers(2**31))
        transforms = getattr(self.dataset, "transform", None)
        for t in (transforms.values() if isinstance(transforms, dict) else [transforms]):
            if hasattr(t, "set_random_seed"):
                t.set_random_seed(seed)
        sample = self.dataset[index]
        return {k: v for k, v in sample.items() if k != "filename"}


class _Stage:
    """What torchgeo's `on_after_batch_transfer` reads of a Trainer to pick `<split>_aug`."""

    def __init__(self, split: str):
        self.training = split == "train"
        self.validating = split == "val"
        self.sanity_checking = self.testing = self.predicting = False


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


def _as_float(out: Any) -> Any:
    if getattr(out, "output", None) is not None and out.output.is_floating_point():
        out.output = out.output.float()
    aux = getattr(out, "auxiliary_heads", None)
    if aux:
        out.auxiliary_heads = {k: v.float() for k, v in aux.items()}
    return out


class TaskSteps:
    """The body of the task's training_step / validation_step, on terrascale's prepared model."""

    def __init__(self, task: Any, datamodule: Any, input_dtype: torch.dtype = torch.float32):
        from terratorch.tasks import SemanticSegmentationTask

        self.task, self.datamodule, self.input_dtype = task, datamodule, input_dtype
        self.segmentation = isinstance(task, SemanticSegmentationTask)

    def batch(self, batch: dict, split: str) -> tuple[Any, torch.Tensor, dict]:
        dm = self.datamodule
        if dm is not None and hasattr(dm, "on_after_batch_transfer"):
            previous = getattr(dm, "trainer", None)
            dm.trainer = _Stage(split)
            try:
                batch = dm.on_after_batch_transfer(dict(batch), 0)
            finally:
                dm.trainer = previous
        y = batch["mask"]
        if self.segmentation:
            y = self.task.squeeze_ground_truth(y)
        rest = {k: batch[k] for k in batch.keys() - {"image", "mask", "filename"}}
        return _cast(batch["image"], self.input_dtype), y, rest

    def _loss(self, handler, out, y) -> torch.Tensor:
        self._move_criterion(y.device)
        return handler.compute_loss(out, y, self.task.criterion, self.task.aux_loss)["loss"]

    def _move_criterion(self, device: torch.device) -> None:
        crit = self.task.criterion
        if isinstance(crit, nn.Module):
            crit.to(device)

    def train_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x, y, rest = self.batch(batch, "train")
        return self._loss(self.task.train_loss_handler, _as_float(model(x, **rest)), y)

    def eval_batch(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from terratorch.tasks.segmentation_tasks import to_segmentation_prediction

        x, y, rest = self.batch(batch, "val")
        out = _as_float(model(x, **rest))
        loss = self._loss(self.task.val_loss_handler, out, y)
        pred = to_segmentation_prediction(out) if self.segmentation else out.output
        return loss, pred, y


def task_kind(task: Any) -> TaskKind:
    """The kind of a built TerraTorch task (a native one or a `terratorch fit` file's), from its class: terrascale's
    change-detection task, else any SemanticSegmentationTask (segmentation), else regression."""
    names = {c.__name__ for c in type(task).__mro__}
    if CHANGE_DETECTION.task_class in names:
        return CHANGE_DETECTION
    return SEGMENTATION if SEGMENTATION.terratorch_task in names else REGRESSION


def primary_metric(task: Any) -> str:
    """The validation metric a job's curves and sweep summaries lead with (TaskKind.primary_metric): the change
    class's F1 (change detection), mIoU (segmentation), RMSE (regression)."""
    return task_kind(task).primary_metric


class TaskMetrics:
    """The task's own `val_metrics` (a torchmetrics MetricCollection) fed gathered tensors; names as TerraTorch
    logs them without the `val/` prefix (mIoU, Pixel_Accuracy, RMSE, ...). A metric that cannot be computed
    from what validation saw (R2 of fewer than two valid pixels) reports NaN instead of ending the run."""

    def __init__(self, task: Any):
        from torchmetrics import Metric

        self.metrics = task.val_metrics
        for m in self.metrics.modules():  # fed already-gathered tensors: no second sync
            if isinstance(m, Metric):
                m.sync_on_compute = False
        self._device = torch.device("cpu")

    def reset(self) -> None:
        self.metrics.reset()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self._device != pred.device:
            self.metrics.to(pred.device)
            self._device = pred.device
        self.metrics.update(pred, target)

    def compute(self) -> dict[str, float]:
        try:
            values = dict(self.metrics.compute())
        except (ValueError, RuntimeError):  # e.g. torchmetrics' R2 of fewer than two samples: the others still count
            values = {}
            for key, metric in self.metrics.items():
                try:
                    result = metric.compute()
                except (ValueError, RuntimeError) as e:
                    log.debug("metric %s not computable: %s", key, e)
                    result = float("nan")
                values.update(result if isinstance(result, dict) else {key: result})
        out: dict[str, float] = {}
        for name, value in values.items():
            name = name.split("/", 1)[-1]
            value = torch.as_tensor(value)
            if value.numel() == 1:
                out[name] = float(value)
            else:
                out.update({f"{name}_{i}": float(v) for i, v in enumerate(value.flatten().tolist())})
        return out


def _trainable_only(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """configure_optimizers hands over all parameters; DeepSpeed and LoRA want the trainable ones."""
    groups = []
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if g["params"]:
            groups.append(g)
    optimizer.param_groups = groups
    return optimizer


def task_optimizer(task: Any, source: str | None = None) -> tuple[torch.optim.Optimizer, list[dict]]:
    """(optimizer, Lightning scheduler configs) from the task's configure_optimizers()."""
    from torch.optim import Optimizer

    rebind = getattr(task, "terrascale_rebind_optimizer", None)
    if rebind is not None:  # else LoRA adapters would not be in the optimizer (it held the pre-profile parameters)
        rebind()
    conf = task.configure_optimizers()
    scheds: list[Any] = []
    if isinstance(conf, Optimizer):
        opt = conf
    elif isinstance(conf, dict):
        opt = conf["optimizer"]
        if conf.get("lr_scheduler") is not None:
            scheds = [conf["lr_scheduler"]]
    elif isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        opts, scheds = list(conf[0]), list(conf[1])
        if len(opts) != 1:
            raise ConfigError([f"optimizer: the task configures {len(opts)} optimizers; terrascale steps one"],
                              source=source)
        opt = opts[0]
    elif isinstance(conf, (list, tuple)) and len(conf) == 1 and isinstance(conf[0], Optimizer):
        opt = conf[0]
    else:
        raise ConfigError([f"optimizer: configure_optimizers() returned {type(conf).__name__}, which terrascale "
                           "cannot step; give one optimizer and at most one lr_scheduler"], source=source)
    configs = []
    for s in scheds:
        c = dict(s) if isinstance(s, dict) else {"scheduler": s}
        c.setdefault("interval", "epoch")
        c.setdefault("frequency", 1)
        c.setdefault("monitor", getattr(c["scheduler"], "monitor", None) or "val/loss")
        if c["interval"] not in ("step", "epoch"):
            raise ConfigError([f"lr_scheduler: interval {c['interval']!r}; use step or epoch"], source=source)
        configs.append(c)
    return _trainable_only(opt), configs


class LightningSchedule:
    """Steps the task's schedulers where Lightning does: `interval: step` after every optimizer step,
    `interval: epoch` at each epoch end (every `frequency`); ReduceLROnPlateau with the monitored value of
    the validation that ends the epoch (`val/loss` -> the val record's `loss`). The loop calls `step()` after
    each optimizer step; `observe(record)` gets every logged record."""

    def __init__(self, configs: list[dict], per_epoch: int):
        self.configs, self.per_epoch = configs, max(1, per_epoch)
        self.steps, self.epochs = 0, 0
        self.pending: list[int] = []  # plateau schedulers waiting for the epoch's validation
        self.last_val: dict[str, float] = {}
        self.warned = False

    @staticmethod
    def _plateau(c: dict) -> bool:
        return isinstance(c["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)

    def _metric(self, c: dict) -> float | None:
        key = str(c["monitor"])
        for k in (key, key.split("/", 1)[-1]):
            if k in self.last_val:
                return self.last_val[k]
        return None

    def _step_plateau(self, c: dict) -> None:
        value = self._metric(c)
        if value is None:
            if not self.warned:
                log.warning("lr_scheduler ReduceLROnPlateau monitors %s but no validation has reported it yet; "
                            "not stepped", c["monitor"])
                self.warned = True
            return
        c["scheduler"].step(value)

    def step(self) -> None:
        for i in self.pending:  # the epoch ended without a validation at that step: use the latest one
            self._step_plateau(self.configs[i])
        self.pending = []
        self.steps += 1
        for i, c in enumerate(self.configs):
            if c["interval"] == "step" and self.steps % c["frequency"] == 0:
                self._step_plateau(c) if self._plateau(c) else c["scheduler"].step()
        if self.steps % self.per_epoch == 0:
            self.epochs += 1
            for i, c in enumerate(self.configs):
                if c["interval"] == "epoch" and self.epochs % c["frequency"] == 0:
                    if self._plateau(c):
                        self.pending.append(i)
                    else:
                        c["scheduler"].step()

    def observe(self, record: dict) -> None:
        if record.get("split") != "val":
            return
        self.last_val = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for i in self.pending:
            self._step_plateau(self.configs[i])
        self.pending = []

    def state_dict(self) -> dict:
        def clean(state: dict) -> dict:
            state = dict(state)
            state.pop("lr_lambdas", None)
            if "_schedulers" in state:
                state["_schedulers"] = [clean(s) for s in state["_schedulers"]]
            return state

        return {"steps": self.steps, "epochs": self.epochs, "pending": self.pending, "last_val": self.last_val,
                "schedulers": [clean(c["scheduler"].state_dict()) for c in self.configs]}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.epochs = state["steps"], state["epochs"]
        self.pending, self.last_val = list(state["pending"]), dict(state["last_val"])
        for c, s in zip(self.configs, state["schedulers"]):
            s = dict(s)
            if isinstance(c["scheduler"], torch.optim.lr_scheduler.LambdaLR):
                s["lr_lambdas"] = [None] * len(s.get("base_lrs", []))
            c["scheduler"].load_state_dict(s)


def build_task_model(exp) -> nn.Module:
    """The task's model alone (no datamodule): what export and predict rebuild."""
    return instantiate(exp.terratorch, exp.run.seed, with_data=False).task.model
