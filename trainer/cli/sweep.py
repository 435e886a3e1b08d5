"""`terrascale sweep` (and `launch/sweep.py`): run experiments one after another as resumable jobs.

Cheap to import (listed in `trainer.cli.COMMAND_MODULES`); the sweep itself never imports TerraTorch,
DeepSpeed or Accelerate: each job is a subprocess.
"""
from __future__ import annotations

import argparse

EPILOG = """A matrix file holds one `sweep:` section:

  sweep:
    base: launch/configs/demo.yaml          # experiment YAML (relative to the cwd or to this file)
    axes:                                   # every combination is one job
      model.backbone: [prithvi_eo_tiny, prithvi_eo_v2_tiny_tl]
      memory.profile: [full, zero3_offload]
    overrides: {run.max_steps: 200}         # for every job
    dir: runs/sweeps/backbones              # default runs/sweeps/<file name>
    processes: 2                            # optional: accelerate launch --num_processes 2
    accelerate_config: launch/configs/accelerate/multi_gpu.yaml   # optional

Jobs land in <dir>/<job>/ (checkpoints, metrics.jsonl, sweep.stderr.log); <dir>/summary.md and summary.csv
compare them. Ctrl-C or SIGTERM stops the running job at a checkpoint; the same command continues."""


def _run(args: argparse.Namespace) -> int:
    from trainer.sweep.sweep import job_command, load_sweep, run_sweep

    specs = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    sweep = load_sweep(specs, overrides, args.dir, args.processes, args.accelerate_config)
    if args.dry_run:
        for job in sweep.jobs:
            print(f"{job.name}: {' '.join(job_command(job, sweep.launcher, sweep.dir / job.name))}")
        return 0
    return run_sweep(sweep)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run experiments (files or a matrix) one after another as resumable jobs",
        description="Runs each experiment as its own resumable job under one sweep dir, skips finished ones, "
        "records failures and goes on, and writes summary.md / summary.csv (final metrics, planned vs observed "
        "memory, time per job).", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                   help="experiment YAMLs and/or matrix files; key=value items are overrides for every job")
    p.add_argument("--dir", help="sweep dir (default: the matrix's `dir`, else runs/sweeps/<first file name>)")
    p.add_argument("--processes", type=int, help="processes per job (accelerate launch); default 1")
    p.add_argument("--accelerate-config", help="Accelerate config file for every job (launch/configs/accelerate/)")
    p.add_argument("--dry-run", action="store_true", help="print each job's command and exit")
    p.set_defaults(func=_run)
