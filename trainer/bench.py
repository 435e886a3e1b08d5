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

from trainer.checkpoint import Progress, StopRequest
from trainer.config import Experiment

log = logging.getLogger(__name__)


def _plain_loop(job, steps: int) -> float:
    """The loop a user would write from Accelerate's docs."""
    from trainer.models import model_output
    from trainer.tasks import build_loss

    acc, model, opt, sched = job.accelerator, job.model, job.optimizer, job.scheduler
    loss_fn = build_loss(job.exp.task)
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        for batch in job.train_loader:
            with acc.accumulate(model):
                out = model_output(model(batch["image"].to(job.input_dtype)))
                loss = loss_fn(out.float(), batch["mask"])
                acc.backward(loss)
                opt.step()
                if not job.scheduler_in_engine:
                    sched.step()
                opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return time.perf_counter() - t0


def _our_loop(job, steps: int, log_path: Path) -> float:
    from trainer.loop import train
    from trainer.report import MetricsLog
    from trainer.run import loop_parts

    metrics_log = MetricsLog(log_path, job.accelerator.is_main_process)
    parts = loop_parts(job, metrics_log.append, lambda p: None, StopRequest())
    parts.total = steps
    parts.final_eval = False
    t0 = time.perf_counter()
    train(parts, Progress(world_size=job.accelerator.num_processes))
    return time.perf_counter() - t0


def overhead(exp: Experiment, steps: int, rounds: int, warmup: int, out: Path) -> dict:
    """Returns and writes {ours_s, plain_s, ratio, ...}; ratio = median(ours) / median(plain)."""
    from trainer.run import setup

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
    from trainer.run import _shutdown

    _shutdown(job.accelerator)
    return result
