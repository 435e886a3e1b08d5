"""`memory.profile: auto` at run time: plan, pick the fastest profile that fits, and keep that choice for the job.

The budgets come from, in order: `memory.gpu_memory` / `memory.cpu_memory` (or the plan command's flags), the
detected GPU / this machine's RAM, and for the GPU without either, the RTX 4090 this launcher is sized for.
The choice is written into the job's frozen `config.yaml` (`memory.profile: <name>`) and its reasons into
`plan.txt`; a resumed job keeps the profile its checkpoints were written with, whatever the planner would say
now (another GPU, another budget), because a checkpoint only loads into the layout that wrote it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trainer.config import Experiment

log = logging.getLogger("terrascale")

DEFAULT_GPU = "24GiB"  # the RTX 4090 this launcher is sized for, when no GPU can be asked


def detected_gpu_bytes() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def detected_cpu_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budgets(exp: Experiment | None, gpu_flag: str | None = None, cpu_flag: str | None = None,
            ) -> tuple[int, int, str]:
    """(GPU bytes, CPU bytes, where the GPU figure came from): a flag, else the config, else the hardware."""
    from trainer.plan.planner import parse_size

    gpu, gpu_src = gpu_flag, "--gpu-memory"
    if gpu is None and exp is not None and exp.memory.gpu_memory:
        gpu, gpu_src = exp.memory.gpu_memory, "memory.gpu_memory"
    if gpu is None:
        found = detected_gpu_bytes()
        gpu, gpu_src = (found, "the detected GPU") if found else (DEFAULT_GPU, "the default (RTX 4090, no GPU here)")
    cpu, cpu_src = cpu_flag, "--cpu-memory"
    if cpu is None and exp is not None and exp.memory.cpu_memory:
        cpu, cpu_src = exp.memory.cpu_memory, "memory.cpu_memory"
    cpu_bytes = parse_size(cpu, cpu_src) if cpu is not None else detected_cpu_bytes()
    return parse_size(gpu, gpu_src), cpu_bytes, gpu_src


@dataclass(frozen=True)
class AutoChoice:
    profile: str
    reason: str
    table: str
    kept: bool  # True: taken from the job's frozen config (a resume), not planned now
    assumed_gpu: bool = False  # no GPU detected and no memory.gpu_memory: planned for the default card


def frozen_profile(job_dir: Path) -> str | None:
    """The concrete profile a job was started with, from its frozen config.yaml (None for a new job)."""
    import yaml

    path = job_dir / "config.yaml"
    if not path.exists():
        return None
    name = ((yaml.safe_load(path.read_text()) or {}).get("memory") or {}).get("profile")
    return name if name and name != "auto" else None


def choose(exp: Experiment, resuming: bool, builders=None, inputs=None) -> AutoChoice:
    """The profile `auto` stands for in this run. Raises PlanError (with the plan table) when none fits.

    `inputs()`, called only when a plan is needed (not when a resumed job keeps its profile), returns more
    `plan_experiment` keywords: for a `terratorch fit` file the builders that hand over its built model, its batch
    shape and a label (`trainer.plan.terratorch_plan.plan_inputs`)."""
    from trainer.plan.assumptions import PLAN_WORLD_SIZE
    from trainer.plan.planner import choose_profile
    from trainer.runtime import world_size

    if resuming and (kept := frozen_profile(exp.job_dir)):
        return AutoChoice(kept, f"{kept}, chosen when this job started ({exp.job_dir / 'config.yaml'}); a resumed "
                          "job keeps the profile its checkpoints were written with", "", kept=True)
    gpu, cpu, gpu_src = budgets(exp)
    extra = {"builders": builders, **(inputs() if inputs is not None else {})}
    profile, table, reason = choose_profile(exp, gpu, cpu, exp.memory.nvme_path, **extra)
    world = world_size()
    per_gpu = "" if world == PLAN_WORLD_SIZE else (f" (planned for one GPU; with {world} processes ZeRO shards "
                                                   "states further, so the plan is conservative)")
    return AutoChoice(profile.name, f"{reason}; GPU budget from {gpu_src}{per_gpu}", table, kept=False,
                      assumed_gpu=gpu_src.startswith("the default"))


def resolve(exp: Experiment, resuming: bool, builders=None, inputs=None) -> tuple[Experiment, AutoChoice | None]:
    """`exp` with `memory.profile: auto` replaced by the chosen profile (unchanged for any other profile)."""
    if exp.memory.profile != "auto":
        return exp, None
    from trainer.plan.builders import quiet

    with quiet():
        choice = choose(exp, resuming, builders, inputs)
    chosen = exp.model_copy(update={"memory": exp.memory.model_copy(update={"profile": choice.profile})})
    return chosen, choice


def write_plan(job_dir: Path, choice: AutoChoice) -> None:
    """plan.txt beside the frozen config: the table the choice was made from and why (new jobs only)."""
    if choice.kept:
        return
    tmp = job_dir / "plan.txt.tmp"
    tmp.write_text(f"memory.profile: auto -> {choice.reason}\n\n{choice.table}\n")
    os.replace(tmp, job_dir / "plan.txt")
