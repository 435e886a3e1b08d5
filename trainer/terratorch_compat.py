"""Run a `terratorch fit -c config.yaml` (LightningCLI) file through terrascale unchanged.

TerraTorch builds, terrascale trains. The `model`, `data`, `optimizer` and `lr_scheduler` sections are kept
verbatim (`Experiment.terratorch`) and instantiated later by TerraTorch's own LightningCLI parser
(`trainer.model.terratorch_task`): any task, any model factory, its losses, metrics and datamodule. This module
only reads the `trainer:` section and the top-level keys, cheaply (no TerraTorch import):

- honoured (become `run.*` / `checkpoint.*`): max_epochs, max_steps, precision, accumulate_grad_batches,
  gradient_clip_val (+ gradient_clip_algorithm: norm), check_val_every_n_epoch, log_every_n_steps,
  default_root_dir, seed_everything;
- noted (logged, no effect on results here): the keys in `_TRAINER_NOTED`;
- refused (exit 2, naming the key): anything else that would change what is trained.
"""
from __future__ import annotations

import logging
from typing import Any

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

LIGHTNING_SECTIONS = ("model", "data", "optimizer", "lr_scheduler")
# The tasks whose training_step is a pixel-wise loss on batch["image"] -> batch["mask"] (the loop's shape), and
# the native task.name each becomes (trainer.config.TaskKind.terratorch_task; not imported: config imports this).
TERRATORCH_TASKS = {"SemanticSegmentationTask": "segmentation", "PixelwiseRegressionTask": "regression"}
_PRECISION = {"32": "fp32", "32-true": "fp32", "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
              "16": "fp16", "16-mixed": "fp16"}
# Lightning trainer keys whose job Accelerate/DeepSpeed/terrascale do instead: noted, not applied.
_TRAINER_NOTED = {"accelerator", "devices", "num_nodes", "strategy", "logger", "callbacks", "enable_checkpointing",
                  "enable_progress_bar", "enable_model_summary", "num_sanity_val_steps", "benchmark",
                  "detect_anomaly", "profiler", "plugins", "use_distributed_sampler", "deterministic",
                  "inference_mode", "barebones", "min_epochs", "min_steps", "limit_test_batches",
                  "limit_predict_batches", "sync_batchnorm", "reload_dataloaders_every_n_epochs",
                  "model_registry"}
_TRAINER_HONOURED = {"max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val",
                     "gradient_clip_algorithm", "check_val_every_n_epoch", "log_every_n_steps", "default_root_dir"}
# value that keeps Lightning's default behaviour (so the key can be noted instead of refused)
_TRAINER_NEUTRAL = {"limit_train_batches": (None, 1.0, 1), "limit_val_batches": (None, 1.0, 1),
                    "val_check_interval": (None, 1.0), "overfit_batches": (None, 0, 0.0),
                    "fast_dev_run": (None, False, 0), "max_time": (None,)}
# TerraTorch CLI top-level keys that concern predict/deploy outputs, not training
_TOP_NOTED = {"predict_output_dir", "output_file_prefix", "out_dtype", "deploy_config_file"}

NOTES: list[str] = []


def is_lightning_config(raw: dict[str, Any]) -> bool:
    model = raw.get("model")
    return isinstance(model, dict) and "class_path" in model


def short_name(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides of the LightningCLI file itself: model./data./trainer./optimizer./lr_scheduler./seed_everything,
    terrascale overrides: memory./run./checkpoint./...)."""
    lightning_keys = (*LIGHTNING_SECTIONS, "trainer", "seed_everything", "custom_modules_path")
    ours, theirs = [], []
    for item in overrides:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        (theirs if head in lightning_keys else ours).append(item)
    return theirs, ours


def from_lightning_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The terrascale experiment (raw dict) for a LightningCLI file; every problem raised at once."""
    problems: list[str] = []
    notes: list[str] = []
    out: dict[str, Any] = {"run": {}, "checkpoint": {}, "task": {}}
    spec: dict[str, Any] = {"config": {k: raw[k] for k in LIGHTNING_SECTIONS if raw.get(k) is not None},
                            "source": source}
    task_name = short_name(raw["model"].get("class_path", ""))
    kind = TERRATORCH_TASKS.get(task_name)
    if kind is None:
        problems.append(f"model.class_path: {raw['model'].get('class_path')!r}: terrascale's loop trains pixel-wise "
                        f"tasks; use one of {', '.join('terratorch.tasks.' + t for t in TERRATORCH_TASKS)}")
    else:
        out["task"]["name"] = kind
    init = raw["model"].get("init_args") or {}
    num_classes = (init.get("model_args") or {}).get("num_classes") if isinstance(init, dict) else None
    if kind == "segmentation" and isinstance(num_classes, int) and num_classes >= 2:
        out["task"]["num_classes"] = num_classes
    if not isinstance(raw.get("data"), dict) or "class_path" not in raw["data"]:
        problems.append("data: a terratorch config needs data.class_path (a datamodule, e.g. "
                        "GenericNonGeoSegmentationDataModule) and its init_args")
    batch = ((raw.get("data") or {}).get("init_args") or {}).get("batch_size") if isinstance(raw.get("data"),
                                                                                            dict) else None
    if isinstance(batch, int):
        out["data"] = {"batch_size": batch}  # what the planner and the DeepSpeed config see
    _trainer(raw.get("trainer") or {}, out, spec, problems, notes)
    if "seed_everything" in raw:
        seed = raw["seed_everything"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            problems.append(f"seed_everything: {seed!r}; give an integer seed (terrascale runs are reproducible: a "
                            "random seed per run is not supported)")
        else:
            out["run"]["seed"] = seed
    else:
        out["run"]["seed"] = 0  # TerraTorch's CLI default (seed_everything_default=0)
    if raw.get("custom_modules_path"):
        spec["custom_modules_path"] = str(raw["custom_modules_path"])
    for key in raw:
        if key in _TOP_NOTED:
            notes.append(f"{key} concerns `terratorch predict` outputs; not used in training")
        elif key not in (*LIGHTNING_SECTIONS, "trainer", "seed_everything", "ckpt_path", "custom_modules_path"):
            problems.append(f"{key}: not a LightningCLI section terrascale knows (model, data, trainer, optimizer, "
                            "lr_scheduler, seed_everything, custom_modules_path)")
    if raw.get("ckpt_path"):
        problems.append("ckpt_path: resume a terrascale job with checkpoint.resume=<step dir> (or just re-run the "
                        "same command: it resumes from the job dir)")
    if problems:
        raise ConfigError(problems, source=source)
    NOTES[:] = notes
    for n in notes:
        log.info("terratorch config %s: %s", source, n)
    out["terratorch"] = spec
    return {k: v for k, v in out.items() if v}


def _trainer(tr: Any, out: dict, spec: dict, problems: list[str], notes: list[str]) -> None:
    if not isinstance(tr, dict):
        problems.append(f"trainer: {tr!r} must be a mapping of Lightning Trainer arguments")
        return
    run = out["run"]
    epochs, steps = tr.get("max_epochs"), tr.get("max_steps")
    if epochs not in (None, -1):
        run["max_epochs"] = epochs
        run["max_steps"] = None
    if steps not in (None, -1):
        run["max_steps"] = steps
    if epochs in (None, -1) and steps in (None, -1):
        run["max_epochs"], run["max_steps"] = 1000, None  # Lightning's default when neither is set
        notes.append("trainer.max_epochs/max_steps unset: Lightning's default of 1000 epochs applies")
    if "precision" in tr and tr["precision"] is not None:
        p = str(tr["precision"])
        if p not in _PRECISION:
            problems.append(f"trainer.precision: {p!r}; use one of {', '.join(_PRECISION)}")
        else:
            run["precision"] = _PRECISION[p]
    for src, dst in (("accumulate_grad_batches", "grad_accum"), ("log_every_n_steps", "log_every")):
        if tr.get(src) is not None:
            run[dst] = tr[src]
    # Lightning clips only when gradient_clip_val is set (terrascale's default is 1.0: not applied here)
    run["grad_clip"] = tr.get("gradient_clip_val") or None
    if tr.get("gradient_clip_algorithm") not in (None, "norm"):
        problems.append(f"trainer.gradient_clip_algorithm: {tr['gradient_clip_algorithm']!r}; terrascale (and "
                        "DeepSpeed) clip by norm: use norm or remove the key")
    every = tr.get("check_val_every_n_epoch", 1)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            problems.append(f"trainer.check_val_every_n_epoch: {every!r}; give a positive integer")
        else:
            spec["eval_every_epochs"] = every
    if tr.get("default_root_dir"):
        out["checkpoint"]["dir"] = str(tr["default_root_dir"])
    for k, v in tr.items():
        if k in _TRAINER_HONOURED:
            continue
        if k in _TRAINER_NOTED:
            notes.append(f"trainer.{k} is handled by Accelerate/DeepSpeed and terrascale's job dir; not applied")
        elif k in _TRAINER_NEUTRAL and v in _TRAINER_NEUTRAL[k]:
            notes.append(f"trainer.{k}: {v!r} is Lightning's default behaviour")
        elif k in _TRAINER_NEUTRAL:
            hint = ("set run.max_steps / run.stop_at_step instead" if k in ("fast_dev_run", "max_time",
                                                                           "limit_train_batches", "overfit_batches")
                    else "remove it (terrascale validates on the whole val set)")
            problems.append(f"trainer.{k}: {v!r} would change what is trained or evaluated and is not honoured; {hint}")
        else:
            problems.append(f"trainer.{k}: no terrascale equivalent; remove it (honoured: "
                            f"{', '.join(sorted(_TRAINER_HONOURED))})")
