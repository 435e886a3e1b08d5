"""`terrascale plan` / `launch/plan.py`: will this experiment fit one GPU, with which profile, how fast at best.

Listed in `trainer.cli.COMMAND_MODULES` (it calls `add_parser`). The fast path imports neither TerraTorch nor
Accelerate: catalog backbones are traced from terrascale's own classes and the decoder measurement comes from
the cache; `terratorch_builders()` is handed to the planner for what only TerraTorch can build (a new decoder
configuration, Prithvi/TerraMind/Clay), imported only when such a measurement is missing. A `terratorch fit` file
is planned on the model and batch TerraTorch's CLI builds for it (`trainer.plan.terratorch_plan.plan_file`: imports
TerraTorch always).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from trainer.plan.auto import DEFAULT_GPU, budgets as _budgets
from trainer.plan.builders import quiet, terratorch_builders


def budgets(args: argparse.Namespace, exp) -> tuple[int, int, str]:
    return _budgets(exp, args.gpu_memory, args.cpu_memory)


def _plan(args: argparse.Namespace) -> int:
    from trainer.errors import ConfigError

    with quiet():
        if args.fit_table:
            from trainer.plan.fit_table import write_fit_table

            path = write_fit_table(args.fit_table, builders=terratorch_builders(), readme=args.readme)
            print(f"wrote {path}" + (f" and the summary in {args.readme}" if args.readme else ""))
            return 0
        if args.readme:
            raise ConfigError(["plan: --readme goes with --fit-table"])
        if not args.config:
            raise ConfigError(["plan: give --config X.yaml (or --fit-table PATH)"])
        from trainer.config import load_experiment
        from trainer.plan.planner import plan_experiment

        exp = load_experiment(args.config, args.overrides)
        gpu, cpu, gpu_src = budgets(args, exp)
        if exp.terratorch is not None:  # TerraTorch's CLI builds the file's model and datamodule (imports it)
            unsupported = [flag for flag, given in (("--inference", args.inference), ("--tile-size", args.tile_size),
                                                     ("--windows", args.windows), ("--precision", args.precision),
                                                     ("--device", args.device != "cuda")) if given]
            if unsupported:
                raise ConfigError([f"plan: {', '.join(unsupported)}: a terratorch file is planned for training on "
                                   "the batch its datamodule delivers; leave these out"], source=args.config)
            from trainer.plan.terratorch_plan import plan_file

            with contextlib.redirect_stdout(sys.stderr):  # TerraTorch prints while building; stdout is the answer
                plan = plan_file(exp, gpu, cpu, args.nvme or exp.memory.nvme_path)
        elif args.inference:
            from trainer.plan.inference import PRECISIONS, plan_inference

            plan = plan_inference(exp, gpu, cpu, windows=args.windows, tile_size=args.tile_size,
                                  precisions=tuple(args.precision or PRECISIONS),
                                  builders=terratorch_builders(), device=args.device)
        else:
            if args.windows or args.precision or args.device != "cuda":
                raise ConfigError(["plan: --windows, --precision and --device go with --inference"])
            plan = plan_experiment(exp, gpu, cpu, args.nvme or exp.memory.nvme_path, tile_size=args.tile_size, builders=terratorch_builders())
    if args.json:
        json.dump(plan.to_json(), sys.stdout, indent=1)
        print()
    else:
        print(plan.table())
        print(f"(GPU budget from {gpu_src}: {gpu / 2**30:.1f} GiB)")
    return 0


def register() -> None:
    """List this module in trainer.cli's subcommand modules (a no-op once trainer.cli lists it itself)."""
    from trainer import cli

    if __name__ not in cli.COMMAND_MODULES:
        cli.COMMAND_MODULES.append(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from trainer.cli import EPILOG_OVERRIDES

    p = sub.add_parser("plan", help="estimate GPU/CPU memory and step time of every memory profile",
                       description="For the experiment's backbone, every memory profile: GPU peak (parameters, "
                       "gradients, optimizer states, activations, temporaries, CUDA allowance), CPU and NVMe needs, "
                       "whether it fits, and step-time lower bounds. Sources and assumptions: docs/planner.md.",
                       epilog=EPILOG_OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="experiment YAML (terrascale or `terratorch fit` format)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied after the file")
    p.add_argument("--gpu-memory", help="GPU budget, e.g. 24GiB (default: memory.gpu_memory, the detected GPU, "
                   f"else {DEFAULT_GPU})")
    p.add_argument("--cpu-memory", help="CPU RAM budget, e.g. 64GiB (default: memory.cpu_memory, else this machine's RAM)")
    p.add_argument("--nvme", metavar="PATH", help="NVMe directory for zero3_nvme (its free space is the budget; default: memory.nvme_path)")
    p.add_argument("--tile-size", type=int, help="tile edge in pixels when the data section does not say")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (schema terrascale.plan/1; with "
                   "--inference terrascale.inference_plan/1)")
    p.add_argument("--inference", action="store_true", help="plan prediction instead of training: GPU and CPU "
                   "memory per window batch (weights in each precision + forward activations, no gradients or "
                   "optimizer), the largest batch that fits, and windows/s and px/s at the GPU's dense peak")
    p.add_argument("--precision", nargs="+", choices=["nf4", "int8", "bf16", "fp32"],
                   help="with --inference: weight precisions to plan (default: all four)")
    p.add_argument("--windows", type=int, help="with --inference: windows per batch (default data.batch_size)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="with --inference: cuda (a GPU of "
                   "the budget, CUDA context counted) or cpu (a CPU run: the CPU is the device)")
    p.add_argument("--fit-table", metavar="PATH", help="regenerate the fit table of every catalog backbone "
                   "(e.g. docs/fit_table.md) instead of planning one config")
    p.add_argument("--readme", metavar="PATH", help="with --fit-table: also write its summary between the "
                   "fit-table markers of this file (README.md)")
    p.set_defaults(func=_plan)
