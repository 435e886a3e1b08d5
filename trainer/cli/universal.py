"""`terrascale universal <step dir>`: convert a ZeRO checkpoint so that another number of processes can resume it.

Cheap to import (listed in `trainer.cli.COMMAND_MODULES`): DeepSpeed is imported when the command runs.
"""
from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.runtime import prepare_environment
    from trainer.train.universal import convert

    prepare_environment(deepspeed=False)  # DS_ACCELERATOR=cpu on a host without CUDA, before DeepSpeed loads
    out = convert(Path(args.step_dir), workers=args.workers, force=args.force)
    print(f"wrote {out}\nresume with any number of processes: run the same training command again "
          "(checkpoint.resume=auto picks this step; the universal copy is used when the process count differs)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "universal", help="convert a DeepSpeed ZeRO checkpoint to a universal one (resume with another GPU count)",
        description="Runs DeepSpeed's ds_to_universal on <step dir>/pytorch_model and writes <step dir>/universal/, "
        "a complete checkpoint whose parameters and Adam states are stored whole. Then re-run the training "
        "command with the new number of processes: it loads the universal copy with DeepSpeed's "
        "`checkpoint.load_universal` and continues from the same step.")
    p.add_argument("step_dir", help="a complete checkpoint, e.g. runs/<job>/checkpoints/step-000300")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel extract/merge processes (each holds one rank's shard in RAM; default 1)")
    p.add_argument("--force", action="store_true", help="convert again even if a universal copy exists")
    p.set_defaults(func=_run)
