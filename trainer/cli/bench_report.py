"""`terrascale bench-report`: throughput and peak memory per backbone × profile, beside the planner's prediction.

Cheap to import (listed in `trainer.cli.COMMAND_MODULES`); each combination runs in its own subprocess.
"""
from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.bench.bench_report import run_report
    from trainer.config import DEMO_CONFIG

    report = run_report(args.config or str(DEMO_CONFIG), args.overrides, args.backbones, args.profiles, args.steps,
                        args.warmup, Path(args.out), args.processes, args.accelerate_config)
    failed = [r for r in report["results"] if r["status"] != "ok"]
    print(f"wrote {args.out}/report.json, report.md, report.png" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-report", help="throughput and peak memory for each backbone × profile, with the planner's numbers",
        description="For each backbone × profile: warm-up steps, then timed steps of the real training loop in "
        "a fresh process (samples/s), one step under torch's MemTracker (tracked tensor bytes), the CUDA "
        "allocator's peak on a GPU and the process's peak RSS, beside the memory planner's prediction. Writes "
        "report.json, report.md and report.png. The same command runs on CPU with tiny backbones and on a GPU "
        "host with real ones.",
        epilog="example (CPU): terrascale bench-report --backbones prithvi_eo_tiny,prithvi_eo_v2_tiny_tl "
        "--profiles full,zero3_offload model.backbone_kwargs.img_size=32 data.synthetic.tile_size=32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="experiment YAML (default: the demo)")
    p.add_argument("--backbones", type=_names, required=True, help="TerraTorch backbone names, comma-separated")
    p.add_argument("--profiles", type=_names, required=True, help="memory profiles, comma-separated (README)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per combination (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--processes", type=int, default=1, help="processes per combination (accelerate launch)")
    p.add_argument("--accelerate-config", help="Accelerate config file (launch/configs/accelerate/)")
    p.add_argument("--out", default="bench_results/report", help="output folder (default bench_results/report)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every combination")
    p.set_defaults(func=_run)
