"""Run a `terratorch fit -c config.yaml` (LightningCLI) file through terrascale unchanged.

The LightningCLI sections are translated into our typed experiment: the task's `model_args` become the
model section, the datamodule is used as-is (`data.kind: terratorch`), `trainer.*` becomes `run.*`.
What has no meaning here is either an error (it would change results) or a logged note (it only
changes bookkeeping that Accelerate/DeepSpeed do their own way); nothing is dropped silently.
"""
from __future__ import annotations

import logging
from typing import Any

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

_TASKS = {"SemanticSegmentationTask": "segmentation", "PixelwiseRegressionTask": "regression"}
_SEG_LOSS = {"ce": "ce", "dice": "dice", "focal": "focal"}
_REG_LOSS = {"mse": "mse", "mae": "l1", "l1": "l1", "huber": "huber"}
_PRECISION = {"32": "fp32", "32-true": "fp32", "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
              "16": "fp16", "16-mixed": "fp16"}
_OPTIMS = {"AdamW": "adamw", "Adam": "adam", "SGD": "sgd"}
_SCHEDS = {"CosineAnnealingLR": "cosine", "LinearLR": "linear", "ConstantLR": "constant"}
# Lightning trainer keys whose job Accelerate/DeepSpeed/terrascale do instead: noted, not applied.
_TRAINER_NOTED = {"accelerator", "devices", "num_nodes", "strategy", "logger", "callbacks", "enable_checkpointing",
                  "enable_progress_bar", "enable_model_summary", "num_sanity_val_steps", "deterministic",
                  "benchmark", "detect_anomaly", "default_root_dir", "limit_val_batches", "limit_train_batches",
                  "check_val_every_n_epoch", "val_check_interval", "fast_dev_run", "profiler", "plugins",
                  "sync_batchnorm", "use_distributed_sampler", "reload_dataloaders_every_n_epochs"}

NOTES: list[str] = []


def is_lightning_config(raw: dict[str, Any]) -> bool:
    model = raw.get("model")
    return isinstance(model, dict) and "class_path" in model


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def from_lightning_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Translate; collect every problem, raise once. Notes go to `NOTES` and the log."""
    problems: list[str] = []
    notes: list[str] = []
    out: dict[str, Any] = {"model": {}, "task": {}, "data": {}, "run": {}, "optim": {}, "scheduler": {},
                           "checkpoint": {}}
    _model(raw.get("model", {}), out, problems, notes)
    _data(raw.get("data"), out, problems)
    _trainer(raw.get("trainer") or {}, out, problems, notes)
    _optim(raw.get("optimizer"), raw.get("lr_scheduler"), out, problems, notes)
    if "seed_everything" in raw and isinstance(raw["seed_everything"], int):
        out["run"]["seed"] = raw["seed_everything"]
    for key in raw:
        if key not in ("model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path"):
            problems.append(f"{key}: not a LightningCLI section terrascale knows (model, data, trainer, optimizer, "
                            "lr_scheduler, seed_everything)")
    if raw.get("ckpt_path"):
        problems.append("ckpt_path: resume a terrascale job with checkpoint.resume=<step dir> instead")
    if problems:
        raise ConfigError(problems, source=source)
    NOTES[:] = notes
    for n in notes:
        log.info("terratorch config %s: %s", source, n)
    return {k: v for k, v in out.items() if v}


def _model(model: dict, out: dict, problems: list[str], notes: list[str]) -> None:
    task = _TASKS.get(_short(model.get("class_path", "")))
    if task is None:
        problems.append(f"model.class_path: {model.get('class_path')!r} is not supported; use one of "
                        + ", ".join(f"terratorch.tasks.{t}" for t in _TASKS))
        return
    out["task"]["name"] = task
    args = dict(model.get("init_args") or {})
    factory = args.pop("model_factory", "EncoderDecoderFactory")
    if factory != "EncoderDecoderFactory":
        problems.append(f"model.init_args.model_factory: {factory!r}; terrascale builds with EncoderDecoderFactory")
    margs = dict(args.pop("model_args", None) or {})
    m = out["model"]
    m["backbone"] = margs.pop("backbone", None) or problems.append("model.init_args.model_args.backbone is missing")
    if "decoder" in margs:
        m["decoder"] = margs.pop("decoder")
    if "necks" in margs:
        m["necks"] = margs.pop("necks")
    if "num_classes" in margs:
        out["task"]["num_classes"] = margs.pop("num_classes")
    margs.pop("num_outputs", None)
    for prefix, key in (("backbone_", "backbone_kwargs"), ("decoder_", "decoder_kwargs"), ("head_", "head_kwargs")):
        picked = {k[len(prefix):]: margs.pop(k) for k in list(margs) if k.startswith(prefix)}
        if picked:
            m[key] = picked
    if "pretrained_path" in m.get("backbone_kwargs", {}):
        m["pretrained_path"] = m["backbone_kwargs"].pop("pretrained_path")
    for k in margs:
        problems.append(f"model.init_args.model_args.{k}: no terrascale equivalent; remove it or prefix it with "
                        "backbone_/decoder_/head_")
    loss = args.pop("loss", None)
    if loss is not None:
        table = _REG_LOSS if task == "regression" else _SEG_LOSS
        if not isinstance(loss, str) or loss not in table:
            problems.append(f"model.init_args.loss: {loss!r} is not available; use one of {', '.join(table)}")
        else:
            out["task"]["loss"] = table[loss]
    if args.get("ignore_index") is not None:
        out["task"]["ignore_index"] = args.pop("ignore_index")
    args.pop("ignore_index", None)
    if args.get("class_weights") is not None:
        out["task"]["class_weights"] = args.pop("class_weights")
    args.pop("class_weights", None)
    if "freeze_backbone" in args:
        m["freeze_backbone"] = bool(args.pop("freeze_backbone"))
    if "lr" in args:
        out["optim"]["lr"] = args.pop("lr")
    for k in ("freeze_decoder", "freeze_head"):
        if args.pop(k, False):
            problems.append(f"model.init_args.{k}: only freeze_backbone is supported; use a LoRA memory profile "
                            "to train a subset")
    for k in ("plot_on_val", "class_names", "path_to_record_metrics", "output_on_inference",
              "output_most_probable", "test_dataloaders_names", "tiled_inference_parameters",
              "tiled_inference_on_testing", "tiled_inference_on_validation"):
        if k in args:
            notes.append(f"model.init_args.{k} concerns Lightning's validation/inference plots; not used in training")
            args.pop(k)
    for k in args:
        problems.append(f"model.init_args.{k}: no terrascale equivalent; remove it")


def _data(data: Any, out: dict, problems: list[str]) -> None:
    if not isinstance(data, dict) or "class_path" not in data:
        problems.append("data: a terratorch config needs data.class_path (a TerraTorch datamodule) and init_args")
        return
    init = dict(data.get("init_args") or {})
    out["data"] = {"kind": "terratorch", "terratorch": {"class_path": data["class_path"], "init_args": init}}
    if "batch_size" in init:
        out["data"]["batch_size"] = init["batch_size"]
    if "num_workers" in init:
        out["data"]["num_workers"] = init["num_workers"]


def _trainer(tr: dict, out: dict, problems: list[str], notes: list[str]) -> None:
    run = out["run"]
    if tr.get("max_epochs") not in (None, -1):
        run["max_epochs"] = tr["max_epochs"]
        run["max_steps"] = None
    if tr.get("max_steps") not in (None, -1):
        run["max_steps"] = tr["max_steps"]
    if "precision" in tr:
        p = str(tr["precision"])
        if p not in _PRECISION:
            problems.append(f"trainer.precision: {p!r}; use one of {', '.join(_PRECISION)}")
        else:
            run["precision"] = _PRECISION[p]
    for src, dst in (("accumulate_grad_batches", "grad_accum"), ("gradient_clip_val", "grad_clip"),
                     ("log_every_n_steps", "log_every")):
        if tr.get(src) is not None:
            run[dst] = tr[src]
    if tr.get("default_root_dir"):
        out["checkpoint"]["dir"] = tr["default_root_dir"]
    for k in tr:
        if k in _TRAINER_NOTED:
            notes.append(f"trainer.{k} is handled by Accelerate/DeepSpeed and terrascale's job dir; ignored")
        elif k not in ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val",
                       "log_every_n_steps"):
            problems.append(f"trainer.{k}: no terrascale equivalent; remove it (see run.* keys)")


def _optim(opt: Any, sched: Any, out: dict, problems: list[str], notes: list[str]) -> None:
    if isinstance(opt, dict):
        name = _OPTIMS.get(_short(opt.get("class_path", "")))
        if name is None:
            problems.append(f"optimizer.class_path: {opt.get('class_path')!r}; use torch.optim.AdamW, Adam or SGD")
        else:
            out["optim"]["name"] = name
            for k, v in (opt.get("init_args") or {}).items():
                if k in ("lr", "weight_decay", "betas", "momentum"):
                    out["optim"][k] = v
                else:
                    problems.append(f"optimizer.init_args.{k}: not supported; remove it")
    if isinstance(sched, dict):
        name = _SCHEDS.get(_short(sched.get("class_path", "")))
        if name is None:
            notes.append(f"lr_scheduler {sched.get('class_path')!r} has no terrascale equivalent: using cosine "
                         "decay per step (set scheduler.name to change it)")
        else:
            out["scheduler"]["name"] = name
