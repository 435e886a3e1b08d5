"""A job made ready to train (`Job`) and the pieces both formats' set-up share (`trainer.train.run.setup` for
native experiments, `trainer.train.terratorch_run.setup` for `terratorch fit` files): where the checkpoint is
loaded, the Accelerator, the `auto` profile choice announced. The profile, its precision, its rendered DeepSpeed
config and the checks that it fits come from `trainer.memory` (`profiles.profile_for`, `profiles.precision_for`,
`deepspeed.config_for`, `profiles.check_deepspeed`), the functions the planner applies too.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import Experiment
from trainer.memory import deepspeed as ds
from trainer.memory.profiles import Profile, compute_dtype
from trainer.plan.auto import DEFAULT_GPU
from trainer.train.checkpoint import has_frozen_parameters
from trainer.train.trackers import offline_env, select_trackers

log = logging.getLogger("terrascale")


def deepspeed_bf16(ds_config: dict | None, precision: str) -> bool:
    """The whole model (and so its inputs) is cast to bf16: DeepSpeed in bf16 does not cast fp32 buffers (Prithvi's
    pos_embed). Without DeepSpeed, Accelerate keeps fp32 weights and autocasts (the planner traces the same:
    trainer.plan.workload.uses_deepspeed_cast)."""
    return ds_config is not None and precision == "bf16"


def load_spec(exp: Experiment, profile: Profile, precision: str, zero_stage: int, has_cuda: bool):
    """How the backbone checkpoint is placed for this run (trainer.backbones.stream.LoadSpec)."""
    from trainer.backbones.stream import LoadSpec

    compute = compute_dtype(precision)
    quantized = profile.quantization != "none"
    zero3 = zero_stage == 3 and not quantized  # transformers never zero.Inits a quantized model either
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return LoadSpec(frozen=profile.lora is not None or exp.model.freeze_backbone, compute_dtype=compute,
                    quantization=profile.quantization, quant_storage=compute if zero_stage == 3 else torch.uint8,
                    device=f"cuda:{local}" if has_cuda and not zero3 else "cpu", zero3=zero3)


def make_accelerator(exp: Experiment, ds_config: dict | None, precision: str):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from trainer.runtime import cuda_available, skip_cpu_shm_comm

    trackers, notes = select_trackers(exp.run.trackers)
    for note in notes:
        log.warning(note)
    os.environ.update(offline_env(trackers, exp.job_dir))
    kwargs: dict[str, Any] = dict(
        gradient_accumulation_steps=exp.run.grad_accum, log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(exp.job_dir), logging_dir=str(exp.job_dir / "logs")))
    if ds_config is not None:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config,
                                                     gradient_accumulation_steps=exp.run.grad_accum)
        if not cuda_available():
            # Without this every rank believes it is rank 0 of 1 under DeepSpeed on a CPU-only host.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            skip_cpu_shm_comm()
    else:
        kwargs["mixed_precision"] = {"fp32": "no"}.get(precision, precision)
        kwargs["cpu"] = not cuda_available()
    return Accelerator(**kwargs)


@dataclass
class Job:
    """An experiment made ready to train: everything prepared by Accelerate, nothing trained yet."""

    exp: Experiment
    profile: Profile
    precision: str
    ds_config: dict | None
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scheduler_in_engine: bool
    train_loader: Any
    val_loader: Any
    sampler: Any
    train_ds: Any
    val_ds: Any
    per_epoch: int
    total: int
    auto_choice: Any = None  # trainer.plan.auto.AutoChoice when the config said memory.profile: auto
    # the TerraTorch task's training/validation step and its metrics (trainer.model.terratorch_task), both formats
    task_steps: Any = None
    task_metrics: Any = None

    @property
    def frozen_excluded(self) -> bool:
        """Checkpoints leave out frozen weights (LoRA/QLoRA without DeepSpeed)."""
        return self.ds_config is None and has_frozen_parameters(self.model)

    @property
    def zero_stage(self) -> int:
        return ds.zero_stage(self.ds_config) if self.ds_config else 0

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.bfloat16 if deepspeed_bf16(self.ds_config, self.precision) else torch.float32


def agree_on_auto(accelerator, name: str) -> None:
    """Every process planned on its own (same config, same hardware); refuse to train if they disagree (e.g.
    nodes with different GPUs) rather than let ranks build different models."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    names: list = [None] * accelerator.num_processes
    dist.all_gather_object(names, name)
    if len(set(names)) > 1:
        from trainer.errors import PlanError

        raise PlanError(f"memory.profile auto chose different profiles on different processes ({names}): the "
                        "GPUs differ; set memory.gpu_memory to the smallest card's size or name the profile")


def announce_auto(accelerator, choice) -> None:
    """Log an `auto` choice once every process agreed on it (trainer.plan.auto.AutoChoice)."""
    agree_on_auto(accelerator, choice.profile)
    log.info("memory.profile auto -> %s", choice.reason)
    if choice.assumed_gpu:
        log.warning("no GPU detected and memory.gpu_memory unset: auto planned for a %s RTX 4090; set "
                    "memory.gpu_memory to the card this job is meant for", DEFAULT_GPU)
    if accelerator.is_main_process and not choice.kept:
        log.info("plan this choice was made from:\n%s", choice.table)
