"""`trainer.train.run.setup` for a `terratorch fit` file: TerraTorch builds task, model, loss, metrics and datamodule
(trainer.model.terratorch_task); the profile (`memory.profile: auto`: planned on that model, trainer.plan.terratorch_plan),
Accelerate/DeepSpeed, the loop and the job dir are terrascale's."""
from __future__ import annotations

import logging

import torch

from trainer.config import Experiment
from trainer.errors import ConfigError

log = logging.getLogger("terrascale")


def _refuse(exp: Experiment) -> None:
    problems = []
    if exp.memory.optimizer != "adamw":
        problems.append(f"memory.optimizer: {exp.memory.optimizer!r}: a terratorch file's optimizer is its own "
                        "optimizer block (or the task's optimizer init_arg); remove memory.optimizer")
    if problems:
        raise ConfigError(problems, source=exp.terratorch.source)


def setup(exp: Experiment, universal: bool = False, resuming: bool = False):
    from accelerate.utils import set_seed

    from trainer.memory import deepspeed as ds
    from trainer.memory.profiles import check_deepspeed, compute_dtype, no_backbone_refusal, precision_for, profile_for
    from trainer.model import terratorch_task as T
    from trainer.model.fitting import apply_profile
    from trainer.plan.terratorch_plan import resolve_auto
    from trainer.runtime import cuda_available, prepare_environment, setup_logging, world_size
    from trainer.train import job as J
    from trainer.train.checkpoint import drop_frozen_weights, has_frozen_parameters
    from trainer.train.loop import EpochSampler, steps_per_epoch, total_steps
    from trainer.train.universal import with_load_universal

    _refuse(exp)
    spec = exp.terratorch
    named = exp.memory.profile != "auto"  # auto: the planner chooses once the task and its data are built
    prepare_environment(deepspeed=named and profile_for(exp, exp.memory.profile).deepspeed is not None)
    has_cuda = cuda_available()
    world = world_size()

    built = T.instantiate(spec, exp.run.seed)  # seeded as `terratorch fit` seeds it: the same initial weights
    train_ds, val_ds = T.datasets(built, exp.run.seed)
    batch_size = getattr(built.datamodule, "batch_size", None) or exp.data.batch_size
    num_workers = getattr(built.datamodule, "num_workers", None)
    num_workers = exp.data.num_workers if num_workers is None else num_workers
    if batch_size != exp.data.batch_size:
        exp = exp.model_copy(update={"data": exp.data.model_copy(update={"batch_size": batch_size})})
    per_epoch = steps_per_epoch(len(train_ds), batch_size, world, exp.run.grad_accum)
    if per_epoch < 1:
        raise ConfigError([f"data: {len(train_ds)} training samples are fewer than one step needs (data.init_args."
                           f"batch_size {batch_size} x trainer.accumulate_grad_batches {exp.run.grad_accum} x "
                           f"{world} process(es)); add samples or lower the batch size"], source=spec.source)
    exp, auto_choice = resolve_auto(exp, built, train_ds, batch_size, resuming)
    profile = profile_for(exp, exp.memory.profile)
    prepare_environment(deepspeed=profile.deepspeed is not None)  # a no-op unless auto chose a DeepSpeed profile
    precision = precision_for(exp, profile, on_gpu=has_cuda)
    if spec.eval_every_epochs is not None:  # trainer.check_val_every_n_epoch: validate at epoch ends
        every = spec.eval_every_epochs * per_epoch
        exp = exp.model_copy(update={"run": exp.run.model_copy(update={"eval_every": every})})
    total = total_steps(exp.run, per_epoch)
    ds_config = ds.config_for(exp, profile, precision, world, total)
    if ds_config is not None and ("optimizer" in ds_config or "scheduler" in ds_config):
        raise ConfigError(["memory.deepspeed: the DeepSpeed JSON names its own optimizer/scheduler; a terratorch "
                           "file's optimizer and lr_scheduler blocks are used instead: remove them from the JSON"])
    if universal:
        ds_config = with_load_universal(ds_config)
    stage = ds.zero_stage(ds_config) if ds_config else 0
    check_deepspeed(exp, profile, ds_config)
    accelerator = J.make_accelerator(exp, ds_config, precision)
    setup_logging(accelerator.is_main_process)
    if auto_choice is not None:
        J.announce_auto(accelerator, auto_choice)
    log.info("job %s: TerraTorch %s + %s (%s), profile %s, precision %s, %s, %d process(es), %d steps (%d per "
             "epoch)", exp.job_dir, type(built.task).__name__, type(built.task.model).__name__,
             type(built.datamodule).__name__, profile.name, precision,
             f"DeepSpeed ZeRO-{stage}" if ds_config else "no DeepSpeed", accelerator.num_processes, total, per_epoch)

    set_seed(exp.run.seed)
    model = built.task.model
    path = T.backbone_path(model)
    if problem := no_backbone_refusal(profile, T.missing_backbone(model)):
        raise ConfigError([problem], source=spec.source)
    model = apply_profile(model, profile, compute_dtype(precision), stage, encoder_path=path or "encoder")
    built.task.model = model
    if J.deepspeed_bf16(ds_config, precision):
        model = model.to(torch.bfloat16)
    optimizer, sched_configs = T.task_optimizer(built.task, spec.source)
    scheduler = T.LightningSchedule(sched_configs, per_epoch)

    sampler = EpochSampler(len(train_ds), per_epoch * exp.run.grad_accum * batch_size * world, seed=exp.run.seed)
    loader_kw = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=has_cuda)
    if T.collate_fn(built) is not None:
        loader_kw["collate_fn"] = T.collate_fn(built)
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if ds_config is None and has_frozen_parameters(model):
        accelerator.register_save_state_pre_hook(drop_frozen_weights)
    job = J.Job(exp, profile, precision, ds_config, accelerator, model, optimizer, scheduler, False, train_loader,
                val_loader, sampler, train_ds, val_ds, per_epoch, total, auto_choice)
    job.task_steps = T.TaskSteps(built.task, built.datamodule, job.input_dtype)
    job.task_metrics = T.TaskMetrics(built.task)
    return job
