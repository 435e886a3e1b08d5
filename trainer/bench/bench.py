"""Benchmarks: results go to files, never into timed unit tests.

`overhead`: our training loop against a plain hand-written Accelerate loop on the same prepared model,
optimizer and data, interleaved (ours, plain, ours, plain, ...) in one process so that machine noise hits
both alike. Evaluation and checkpointing are switched off for both: this measures the loop's own
bookkeeping (progress, logging, stop-flag check, accumulation wrapper), the cost a user pays every step.
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import Experiment
from trainer.train.checkpoint import Progress, StopRequest

log = logging.getLogger(__name__)


def _plain_loop(job, steps: int) -> float:
    """The loop a user would write from Accelerate's docs."""
    acc, model, opt, sched = job.accelerator, job.model, job.optimizer, job.scheduler
    batch_loss = job.task_steps.train_loss  # the task's own loss, as the loop computes it
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        for batch in job.train_loader:
            with acc.accumulate(model):
                loss = batch_loss(model, batch)
                acc.backward(loss)
                opt.step()
                sched.step()  # DeepSpeed's own scheduler: Accelerate's wrapper, a no-op (its engine steps it)
                opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return time.perf_counter() - t0


def _our_loop(job, steps: int, log_path: Path) -> float:
    from trainer.train.loop import train
    from trainer.train.report import MetricsLog
    from trainer.train.run import loop_parts

    metrics_log = MetricsLog(log_path, job.accelerator.is_main_process)
    parts = loop_parts(job, metrics_log.append, lambda p: None, StopRequest())
    parts.total = steps
    parts.final_eval = False
    t0 = time.perf_counter()
    train(parts, Progress(world_size=job.accelerator.num_processes))
    return time.perf_counter() - t0


def overhead(exp: Experiment, steps: int, rounds: int, warmup: int, out: Path) -> dict:
    """Returns and writes {ours_s, plain_s, ratio, ...}; ratio = median(ours) / median(plain)."""
    from trainer.train.run import setup

    big = 10**9  # no eval/checkpoint inside the timed window; logging stays at the configured interval
    exp = exp.model_copy(update={"run": exp.run.model_copy(update={
        "eval_every": big, "checkpoint_every": big, "max_steps": max(steps, warmup), "progress": False})})
    job = setup(exp)
    with tempfile.TemporaryDirectory() as tmp:
        _plain_loop(job, warmup)
        _our_loop(job, warmup, Path(tmp) / "warm.jsonl")
        ours, plain = [], []
        for r in range(rounds):
            ours.append(_our_loop(job, steps, Path(tmp) / f"m{r}.jsonl"))
            plain.append(_plain_loop(job, steps))
            log.info("round %d: ours %.3f s, plain %.3f s", r, ours[-1], plain[-1])
    result = {
        "benchmark": "loop_overhead", "backbone": exp.model.backbone, "profile": exp.memory.profile,
        "steps_per_round": steps, "rounds": rounds, "batch_size": exp.data.batch_size,
        "processes": job.accelerator.num_processes,
        "ours_s": ours, "plain_s": plain, "ours_median_s": statistics.median(ours),
        "plain_median_s": statistics.median(plain),
        "ratio": statistics.median(ours) / statistics.median(plain), "target_ratio": 1.05,
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
    }
    if job.accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        log.info("loop overhead %.3fx (target <= 1.05x) -> %s", result["ratio"], out)
    from trainer.train.run import shutdown_job

    shutdown_job(job.accelerator)
    return result


def optimizer_step(n_params: int, repeats: int, out: Path) -> dict:
    """The optimizer step of CPU-offloaded parameters: DeepSpeedCPUAdam vs torch AdamW foreach vs fused.

    Offload profiles step fp32 master weights on the CPU; this is that step alone, on `n_params` parameters
    split like a ViT's layers (4M-element tensors). Each optimizer runs `repeats` timed steps after 2 warm-up
    steps, in turns, and the median is kept. What terrascale uses (`chosen`) must be within 10 % of the best.
    """
    from trainer.runtime import prepare_environment

    prepare_environment(deepspeed=False)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    chunk = 4 * 2**20
    sizes = [chunk] * (n_params // chunk) + ([n_params % chunk] if n_params % chunk else [])

    def make(kind: str):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in sizes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        if kind == "deepspeed_cpu_adam":
            t0 = time.perf_counter()
            opt = DeepSpeedCPUAdam(params, lr=1e-4, adamw_mode=True)  # JIT-compiles its op on first use
            return params, opt, time.perf_counter() - t0
        return params, torch.optim.AdamW(params, lr=1e-4, **{kind.split("_")[-1]: True}), 0.0

    kinds = ["deepspeed_cpu_adam", "torch_adamw_foreach", "torch_adamw_fused"]
    setups = {k: make(k) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:
        for _ in range(2):
            setups[k][1].step()
    for _ in range(repeats):
        for k in kinds:
            t0 = time.perf_counter()
            setups[k][1].step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    best = min(med.values())
    chosen = "torch_adamw_fused"  # what trainer.train.run.build_optimizer passes to offload profiles
    result = {
        "benchmark": "offloaded_optimizer_step", "n_params": n_params, "repeats": repeats,
        "median_ms": med, "deepspeed_cpu_adam_init_s": setups["deepspeed_cpu_adam"][2],
        "chosen": chosen, "chosen_vs_best": med[chosen] / best,
        "chosen_vs_foreach_speedup": med["torch_adamw_foreach"] / med[chosen],
        "targets": {"chosen_vs_best_max": 1.10, "speedup_vs_foreach_min": 5.0},
        "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
