"""`terrascale <command>`: the argument parsers behind `launch/*.py`, and error → exit code handling."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from trainer.errors import TerrascaleError

EPILOG_OVERRIDES = ("Overrides are dotted keys after the options, e.g.\n"
                    "  optim.lr=3e-4 memory.profile=zero3_offload checkpoint.dir=runs/x run.max_steps=50")


def _train(args: argparse.Namespace) -> int:
    from trainer.config import load_experiment
    from trainer.run import main

    return main(load_experiment(args.config, args.overrides))


def _stats(args: argparse.Namespace) -> int:
    from trainer.config import load_experiment
    from trainer.data.stats import write_stats_for

    path = write_stats_for(load_experiment(args.config, args.overrides), force=args.force)
    print(f"wrote {path}")
    return 0


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="experiment YAML (terrascale or `terratorch fit` format)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied after the file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terrascale", description="Train TerraTorch encoder-decoders under "
                                     "Accelerate + DeepSpeed as resumable jobs.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an experiment in its job dir (resumes by default)",
                       description="Train an experiment. Without --config, runs the built-in demo (synthetic "
                       "Sentinel-2 tiles, tiny Prithvi, CPU-friendly). Re-running the same command resumes from "
                       "the newest complete checkpoint; SIGINT/SIGTERM save and stop at the next step.",
                       epilog=EPILOG_OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(t, required=False)
    t.set_defaults(func=_train)
    s = sub.add_parser("stats", help="compute per-band normalization stats of the training tiles",
                       epilog=EPILOG_OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(s)
    s.add_argument("--force", action="store_true", help="recompute even if the stats file exists")
    s.set_defaults(func=_stats)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


# Other modules add their subcommands here (plan, bench, predict, sweep, export), keeping this file small.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def report_error(err: TerrascaleError) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}terrascale: error: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "missing") is None and args.command == "train":
        from trainer.config import DEMO_CONFIG

        args.config = str(DEMO_CONFIG)
    try:
        return args.func(args)
    except TerrascaleError as e:
        report_error(e)
        return e.exit_code


def run_launcher(command: str) -> None:
    """Entry for `launch/<command>.py`: same parser, same exit codes."""
    sys.exit(main([command, *sys.argv[1:]]))
