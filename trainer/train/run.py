"""main(experiment): plan → accelerator → build → resume → loop → export."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from trainer.train.checkpoint import (Progress, StopRequest, drop_frozen_weights, find_resume, has_frozen_parameters,
                                load_checkpoint, save_checkpoint)
from trainer.config import Experiment, dump_experiment
from trainer.errors import ConfigError
from trainer.memory import deepspeed as ds
from trainer.memory.profiles import check_deepspeed, compute_dtype, precision_for, profile_for
from trainer.train.export import export_job, export_metadata
from trainer.train.report import MetricsLog, plot_curves
from trainer.train.trackers import hparams, init_kwargs, select_trackers
from trainer.train.job import Job, announce_auto, deepspeed_bf16, load_spec, make_accelerator
from trainer.train.universal import load_universal, needs_universal, with_load_universal

log = logging.getLogger("terrascale")


def build_optimizer(exp: Experiment, params, ds_config: dict | None):
    """The optimizer for `params` (8-bit states under DeepSpeed are refused earlier, by
    trainer.memory.profiles.check_deepspeed)."""
    o, states = exp.optim, exp.memory.optimizer
    if ds_config is not None and "optimizer" in ds_config:
        from accelerate.utils import DummyOptim

        return DummyOptim(params, lr=o.lr, weight_decay=o.weight_decay)
    if states != "adamw":  # optim.name is adamw (trainer.config.Experiment._eight_bit_states_are_adamw)
        import bitsandbytes as bnb

        from trainer.runtime import cuda_available

        if states == "paged_adamw_8bit" and not cuda_available():
            log.warning("memory.optimizer paged_adamw_8bit: paging needs CUDA unified memory; on this CPU-only host "
                        "bitsandbytes keeps the 8-bit states in ordinary memory (as adamw_8bit)")
        cls = bnb.optim.PagedAdamW8bit if states == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # fused: one kernel per step instead of a loop over tensors; on CPU as fast as DeepSpeedCPUAdam.
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)


def build_scheduler(exp: Experiment, optimizer, total: int, ds_config: dict | None):
    if ds_config is not None and "scheduler" in ds_config:
        from accelerate.utils import DummyScheduler

        return DummyScheduler(optimizer, total_num_steps=total, warmup_num_steps=exp.scheduler.warmup_steps), True
    s = exp.scheduler

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        if s.name == "constant":
            return 1.0
        frac = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if s.name == "cosine" else 1 - frac
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), False


def freeze_config(exp: Experiment, job_dir: Path, fresh: bool = True) -> None:
    """Write the resolved config beside the run; on resume, keep the original and note differences. A fresh
    start (no checkpoint to resume) rewrites it: nothing trained under an older one is kept. Written under a
    temporary name and renamed, so a kill never leaves a truncated config.yaml."""
    path = job_dir / "config.yaml"
    # stop_at_step is a per-invocation knob (time-boxed runs): not a change of the experiment.
    text = dump_experiment(exp.model_copy(update={"run": exp.run.model_copy(update={"stop_at_step": None})}))
    if fresh or not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    elif path.read_text() != text:
        path.with_name("config.resumed.yaml").write_text(text)
        log.warning("the config differs from the one this job started with (%s); the new one is saved as %s",
                    path, path.with_name("config.resumed.yaml"))


def resolve_auto(exp: Experiment, resuming: bool):
    from trainer.plan import auto
    from trainer.plan.builders import terratorch_builders

    return auto.resolve(exp, resuming, builders=terratorch_builders())


def setup(exp: Experiment, universal: bool = False, resuming: bool = False) -> Job:
    """Profile (and `auto`) → datasets → DeepSpeed config → accelerator → model → optimizer and scheduler →
    loaders, prepared by Accelerate; `main` then resumes from the job dir. Each step is one function below, in that order.

    `memory.profile: auto` is replaced by the planner's choice (kept from the job's frozen config when
    `resuming`); `Job.exp` is the experiment as run, with the concrete profile."""
    if exp.terratorch is not None:  # TerraTorch builds task, model, loss, metrics and datamodule
        from trainer.train.terratorch_run import setup as terratorch_setup

        return terratorch_setup(exp, universal=universal, resuming=resuming)
    from trainer.model.terratorch_task import TaskMetrics, TaskSteps
    from trainer.runtime import cuda_available, prepare_environment, world_size

    exp, auto_choice = resolve_auto(exp, resuming)
    profile = profile_for(exp, exp.memory.profile)
    prepare_environment(deepspeed=profile.deepspeed is not None)
    has_cuda = cuda_available()
    precision = precision_for(exp, profile, on_gpu=has_cuda)
    world = world_size()
    # The accelerator needs the rendered DeepSpeed config, whose scheduler may need the total steps, which need the
    # dataset length: datasets come first (cheap: file lists; generation is atomic across ranks).
    train_ds, val_ds, per_epoch, total = _datasets(exp, world)
    ds_config, stage = _deepspeed(exp, profile, precision, world, total, universal)
    accelerator = _accelerator(exp, profile, precision, ds_config, auto_choice, total, per_epoch)
    task, model = _model(exp, profile, precision, stage, has_cuda, ds_config)
    optimizer = build_optimizer(exp, [p for p in model.parameters() if p.requires_grad], ds_config)
    scheduler, scheduler_in_engine = build_scheduler(exp, optimizer, total, ds_config)
    sampler, train_loader, val_loader = _loaders(exp, train_ds, val_ds, per_epoch, world, has_cuda)
    if scheduler_in_engine:
        model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler)
    else:
        # Saved by trainer.train.checkpoint as JSON (register_for_checkpointing would pickle it).
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if ds_config is None and has_frozen_parameters(model):
        accelerator.register_save_state_pre_hook(drop_frozen_weights)
    job = Job(exp, profile, precision, ds_config, accelerator, model, optimizer, scheduler, scheduler_in_engine,
              train_loader, val_loader, sampler, train_ds, val_ds, per_epoch, total, auto_choice)
    job.task_steps = TaskSteps(task, None, job.input_dtype)
    job.task_metrics = TaskMetrics(task)
    return job


def _datasets(exp: Experiment, world: int):
    """(train, val, steps per epoch, total steps)."""
    from trainer.data import build_datasets
    from trainer.train.loop import steps_per_epoch, total_steps

    train_ds, val_ds = build_datasets(exp)
    per_epoch = steps_per_epoch(len(train_ds), exp.data.batch_size, world, exp.run.grad_accum)
    if per_epoch < 1:
        raise ConfigError([f"data: {len(train_ds)} training tiles are fewer than one step needs (data.batch_size "
                           f"{exp.data.batch_size} × run.grad_accum {exp.run.grad_accum} × {world} process(es)); "
                           "add tiles or lower data.batch_size"])
    return train_ds, val_ds, per_epoch, total_steps(exp.run, per_epoch)


def _deepspeed(exp: Experiment, profile, precision: str, world: int, total: int, universal: bool):
    """(the rendered DeepSpeed config or None, its ZeRO stage), the profile's combination rules checked."""
    ds_config = ds.config_for(exp, profile, precision, world, total)
    if universal:  # resuming a ZeRO checkpoint written by another number of processes
        ds_config = with_load_universal(ds_config)
    stage = ds.zero_stage(ds_config) if ds_config else 0
    check_deepspeed(exp, profile, ds_config)
    if ds_config is not None and (problem := ds.nvme_problem(ds_config)):
        raise ConfigError([problem])
    return ds_config, stage


def _accelerator(exp: Experiment, profile, precision: str, ds_config, auto_choice, total: int, per_epoch: int):
    from trainer.runtime import setup_logging

    accelerator = make_accelerator(exp, ds_config, precision)
    setup_logging(accelerator.is_main_process)
    if auto_choice is not None:
        announce_auto(accelerator, auto_choice)
    log.info("job %s: profile %s, precision %s, %s, %d process(es), %d steps (%d per epoch)", exp.job_dir,
             profile.name, precision, f"DeepSpeed ZeRO-{ds.zero_stage(ds_config)}" if ds_config else "no DeepSpeed",
             accelerator.num_processes, total, per_epoch)
    return accelerator


def _model(exp: Experiment, profile, precision: str, stage: int, has_cuda: bool, ds_config):
    """(the TerraTorch task, its model with the profile applied): seeded, checkpoint streamed per `load_spec`."""
    from accelerate.utils import set_seed

    from trainer.model.fitting import apply_profile
    from trainer.model.tasks import build_task

    set_seed(exp.run.seed)
    task = build_task(exp, load_spec(exp, profile, precision, stage, has_cuda))  # model, criterion, metrics
    model = task.model = apply_profile(task.model, profile, compute_dtype(precision), stage)
    if deepspeed_bf16(ds_config, precision):
        model = model.to(torch.bfloat16)
    return task, model


def _loaders(exp: Experiment, train_ds, val_ds, per_epoch: int, world: int, has_cuda: bool):
    """(the epoch sampler, train loader, val loader)."""
    from trainer.train.loop import EpochSampler

    sampler = EpochSampler(len(train_ds), per_epoch * exp.run.grad_accum * exp.data.batch_size * world,
                           seed=exp.run.seed)
    loader_kw = dict(batch_size=exp.data.batch_size, num_workers=exp.data.num_workers, pin_memory=has_cuda)
    # Each loader draws its workers' base seed from its own generator, not from the global torch RNG: every
    # `iter()` of a DataLoader takes one number from `generator` (the global RNG when None). A resumed run
    # creates its (skip-batches) iterator right after restoring the RNG, where the straight run had created it
    # at the epoch start, so with the global RNG the draw shifts every later random number (LoRA dropout masks)
    # and resume is no longer exact. Samples do not depend on it (order and flips are a pure function of
    # (seed, epoch, index)), so this generator needs no checkpointing.
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, drop_last=True,
                                               generator=torch.Generator().manual_seed(exp.run.seed), **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False,
                                             generator=torch.Generator().manual_seed(exp.run.seed + 1), **loader_kw)
    return sampler, train_loader, val_loader


def primary_metric(job: Job) -> str:
    from trainer.model.terratorch_task import primary_metric as task_primary

    return task_primary(job.task_steps.task)


def loop_parts(job: Job, on_log, on_checkpoint, stop: StopRequest):
    from trainer.train.loop import LoopParts

    return LoopParts(
        accelerator=job.accelerator, model=job.model, optimizer=job.optimizer, scheduler=job.scheduler,
        train_loader=job.train_loader, val_loader=job.val_loader,
        sampler=job.sampler, train_dataset=job.train_ds, metrics=job.task_metrics, run=job.exp.run,
        per_epoch=job.per_epoch, total=job.total, on_log=on_log, on_checkpoint=on_checkpoint, stop=stop,
        primary_metric=primary_metric(job), batch_loss=job.task_steps.train_loss, eval_batch=job.task_steps.eval_batch)


def main(exp: Experiment, stop: StopRequest | None = None) -> int:
    """`stop`: a StopRequest installed as early as possible by the caller (signals during start-up); else here."""
    from trainer.runtime import gc_after_start_up, world_size
    from trainer.train.joblock import acquire
    from trainer.train.loop import train

    stop = stop or StopRequest().install()
    job_dir = exp.job_dir
    lock = acquire(job_dir)  # before anything reads or writes the job dir; the global rank 0 only
    resume_from = find_resume(job_dir, exp.checkpoint.resume)
    universal = needs_universal(resume_from, world_size())
    job = setup(exp, universal=universal, resuming=resume_from is not None)
    exp = job.exp  # memory.profile auto resolved
    accelerator = job.accelerator
    if stop.agreed(accelerator):  # signalled during imports, data or DeepSpeed set-up: nothing written yet
        log.warning("stopped on request during start-up, before training; nothing was written. Re-run the same "
                    "command to start.")
        shutdown_job(accelerator)
        return 0
    own_scheduler = None if job.scheduler_in_engine else job.scheduler
    if accelerator.is_main_process:
        job_dir.mkdir(parents=True, exist_ok=True)
        freeze_config(exp, job_dir, fresh=resume_from is None)
        if job.auto_choice is not None:
            from trainer.plan.auto import write_plan

            write_plan(job_dir, job.auto_choice)
        write_load_report(job_dir, accelerator.unwrap_model(job.model))
    metrics_log = MetricsLog(job_dir / "metrics.jsonl", accelerator.is_main_process)
    progress = Progress(world_size=accelerator.num_processes)
    if resume_from is not None:
        progress = (load_universal(accelerator, job.model, resume_from, exp.run.grad_accum, own_scheduler)
                    if universal else load_checkpoint(accelerator, resume_from, job.frozen_excluded, own_scheduler))
        log.info("resumed from %s at step %d (epoch %d)", resume_from, progress.step, progress.epoch)
    metrics_log.resume_at(progress.step)  # on every start: a fresh one (step 0) keeps nothing of a killed run
    trackers, _ = select_trackers(exp.run.trackers)
    accelerator.init_trackers(exp.name, config=hparams(exp.model_dump(mode="json")),
                              init_kwargs=init_kwargs(trackers, exp.name, job_dir))
    primary = primary_metric(job)

    def on_log(record: dict) -> None:
        if hasattr(own_scheduler, "observe"):  # a TerraTorch ReduceLROnPlateau reads the validation metrics
            own_scheduler.observe(record)
        metrics_log.append(record)
        accelerator.log({f"{record['split']}/{k}": v for k, v in record.items()
                         if isinstance(v, (int, float)) and k not in ("step", "split")}, step=record["step"])

    def on_checkpoint(p: Progress) -> None:
        path = save_checkpoint(accelerator, job_dir, p, exp.checkpoint.keep_last, own_scheduler, job.frozen_excluded)
        log.info("checkpoint %s", path)
        if accelerator.is_main_process:
            plot_curves(metrics_log.read(), job_dir / "curves.png", primary)

    gc_after_start_up()
    progress, stopped = train(loop_parts(job, on_log, on_checkpoint, stop), progress)
    if stopped:
        log.warning("stopped at step %d on request; checkpoint saved. Re-run the same command to continue.",
                    progress.step)
    elif exp.checkpoint.export:
        out = export_job(accelerator, job.model, exp, job.profile, job.precision, job.zero_stage,
                         job_dir / "export", export_metadata(exp, job.profile.name, progress.step))
        if out:
            log.info("exported weights to %s (%s)", out, ", ".join(sorted(p.name for p in out.iterdir())))
    shutdown_job(accelerator)
    if lock is not None:
        lock.release()
    return 0


def write_load_report(job_dir: Path, model) -> None:
    """`<job>/load.json`: what the backbone checkpoint load read and how long each phase took."""
    import json

    from trainer.model.models import load_report

    report = load_report(model)
    if report is not None:
        (job_dir / "load.json").write_text(json.dumps(report.as_json(), indent=1) + "\n")


def shutdown_job(accelerator) -> None:
    """Without a final barrier + destroy, rank 0 of a gloo job can exit 1 while others still talk."""
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
