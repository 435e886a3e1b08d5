"""Benchmark report: steady-state throughput and peak memory of each backbone × profile, beside the planner's
prediction. Writes `report.json`, `report.md` and `report.png` under the output folder.

Each combination runs in its own subprocess (`python -m trainer.bench.bench_report measure ...`, or under
`accelerate launch` for several processes), because a process's peak RSS only ever grows and a DeepSpeed engine
is not meant to be built twice in one process. Inside it (`measure`): `trainer.train.run.setup`, `warmup` untimed
steps, `steps` timed steps of the real loop (no eval, no checkpoint), then one more step under torch's
MemTracker for the bytes of live tensors by kind. Memory reported:
- device peak: the CUDA allocator's `max_memory_allocated` on a GPU; on a CPU host, the tracked tensor peak;
- tracked tensors: MemTracker's peak over one steady-state step (parameters, gradients, optimizer states,
  activations, temporaries), the quantity the planner predicts;
- peak RSS: the process's resident peak (libraries and allocator caches included), max over ranks.
The same command runs on a GPU host with real backbones; nothing in it is CPU-specific.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 2**20


# --- inside the subprocess ----------------------------------------------------------------------------------


def measure(exp, steps: int, warmup: int) -> dict[str, Any]:
    """Collective when several processes run. Returns the measurements (identical on every rank)."""
    import resource

    import torch

    from trainer.plan.trace import StepTracker, by_kind
    from trainer.train.checkpoint import Progress, StopRequest
    from trainer.train.loop import train
    from trainer.train.run import shutdown_job, loop_parts, setup

    big = 10**9  # nothing but training steps inside the timed window
    exp = exp.model_copy(update={"run": exp.run.model_copy(update={
        "eval_every": big, "checkpoint_every": big, "log_every": big, "progress": False,
        "max_steps": warmup + steps + 1, "stop_at_step": None})})
    job = setup(exp)
    acc = job.accelerator
    cuda = acc.device.type == "cuda"
    parts = loop_parts(job, lambda record: None, lambda progress: None, StopRequest())
    parts.final_eval = False
    progress = Progress(world_size=acc.num_processes)
    parts.total = warmup
    progress, _ = train(parts, progress)
    if cuda:
        torch.cuda.synchronize(acc.device)
    acc.wait_for_everyone()
    samples0, t0 = progress.samples_seen, time.perf_counter()
    parts.total = warmup + steps
    progress, _ = train(parts, progress)
    if cuda:
        torch.cuda.synchronize(acc.device)  # the GPU may still be working on the last step: count it
    elapsed = time.perf_counter() - t0
    samples = progress.samples_seen - samples0

    tracker = StepTracker()
    tracker.track_external(job.model, job.optimizer)
    parts.total = warmup + steps + 1
    with tracker:
        progress, _ = train(parts, progress)
    tracked = by_kind(tracker.get_tracker_snapshot("peak"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated(acc.device) if cuda else 0
    local = torch.tensor([tracked["total"], rss, gpu, elapsed], dtype=torch.float64, device=acc.device)
    worst = _max_over_ranks(acc, local)
    tracked_total, rss_max, gpu_max, elapsed_max = (float(x) for x in worst.cpu())
    result = {
        "backbone": exp.model.backbone, "profile": job.profile.name, "precision": job.precision,
        "zero_stage": job.zero_stage, "processes": acc.num_processes, "device": acc.device.type,
        "batch_size": exp.data.batch_size, "grad_accum": exp.run.grad_accum, "warmup_steps": warmup,
        "timed_steps": steps, "samples": samples, "seconds": elapsed_max,
        "samples_per_s": samples / elapsed_max,
        "peak_device_mb": (gpu_max if cuda else tracked_total) / MiB,
        "peak_device_source": "cuda max_memory_allocated" if cuda else "tracked tensors (CPU)",
        "tracked_mb": {k: v / MiB for k, v in tracked.items()}, "tracked_peak_mb": tracked_total / MiB,
        "peak_rss_mb": rss_max / MiB,
    }
    shutdown_job(acc)
    return result


def _max_over_ranks(acc, t):
    if acc.num_processes == 1:
        return t
    return acc.gather(t[None]).max(dim=0).values


def _measure_main(argv: list[str]) -> int:
    from trainer.config import load_experiment
    from trainer.errors import report_error
    from trainer.errors import TerrascaleError

    p = argparse.ArgumentParser(prog="python -m trainer.bench.bench_report measure")
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--json", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        result = measure(load_experiment(args.config, args.overrides), args.steps, args.warmup)
    except TerrascaleError as e:
        report_error(e)
        return e.exit_code
    if os.environ.get("RANK", "0") == "0":
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# --- the parent: one subprocess per combination, then the report ---------------------------------------------


def _command(config: str, overrides: list[str], steps: int, warmup: int, out: Path, processes: int,
             accelerate_config: str | None) -> list[str]:
    from trainer.sweep.sweep import Launcher, free_port, launcher_prefix

    launcher = Launcher(processes if processes > 1 else None, accelerate_config)
    multi = accelerate_config is not None or processes > 1
    return [*launcher_prefix(launcher, free_port() if multi else None), "-m", "trainer.bench.bench_report", "measure",
            "--config", config, "--steps", str(steps), "--warmup", str(warmup), "--json", str(out), *overrides]


def run_report(config: str, overrides: list[str], backbones: list[str], profiles: list[str], steps: int,
               warmup: int, out_dir: Path, processes: int = 1, accelerate_config: str | None = None,
               echo=print) -> dict[str, Any]:
    from trainer.config import load_experiment
    from trainer.sweep.sweep import override, planned_memory

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for backbone in backbones:
        for profile in profiles:
            name = f"{backbone}-{profile}"
            combo = [*overrides, override("model.backbone", backbone), override("memory.profile", profile),
                     f"checkpoint.dir={out_dir / 'jobs' / name}"]
            exp = load_experiment(config, combo)
            planned_dev, planned_cpu, note = planned_memory(exp)
            row: dict[str, Any] = {"backbone": backbone, "profile": profile, "planned_device_mb": planned_dev,
                                   "planned_cpu_mb": planned_cpu, "planned_note": note}
            result_path = out_dir / "jobs" / f"{name}.json"
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.unlink(missing_ok=True)
            cmd = _command(config, combo, steps, warmup, result_path, processes, accelerate_config)
            echo(f"[bench-report] {name}: {warmup} warm-up + {steps} timed steps")
            with open(out_dir / "jobs" / f"{name}.log", "w") as logf:
                code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
            if code == 0 and result_path.is_file():
                row.update(json.loads(result_path.read_text()), status="ok")
            else:
                lines = (out_dir / "jobs" / f"{name}.log").read_text(errors="replace").splitlines()
                row.update(status="failed", exit_code=code, error="\n".join(lines[-15:]))
            rows.append(row)
            echo(f"[bench-report] {name}: " + (f"{row['samples_per_s']:.2f} samples/s, peak {row['peak_device_mb']:.0f}"
                                              f" MiB" if row["status"] == "ok" else f"failed (exit {code})"))
    report = {"schema": "terrascale.bench_report/1", "config": config, "overrides": overrides,
              "steps": steps, "warmup": warmup, "processes": processes,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "results": rows}
    write_report(report, out_dir)
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path, Path]:
    from trainer.bench.bench_report_render import markdown, plot

    paths = out_dir / "report.json", out_dir / "report.md", out_dir / "report.png"
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths


if __name__ == "__main__":
    if sys.argv[1:2] != ["measure"]:
        sys.exit("usage: python -m trainer.bench.bench_report measure ... (the report itself: terrascale bench-report)")
    sys.exit(_measure_main(sys.argv[2:]))
