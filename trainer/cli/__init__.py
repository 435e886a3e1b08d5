"""`terrascale <command>`: the argument parsers behind `launch/*.py`, and error → exit code handling."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from trainer.errors import TerrascaleError, report_error

EXIT_ABORTED = 130  # what a shell reports for a process stopped by SIGINT
EPILOG_OVERRIDES = ("Overrides are dotted keys after the options, e.g.\n"
                    "  optim.lr=3e-4 memory.profile=zero3_offload checkpoint.dir=runs/x run.max_steps=50")


def _train(args: argparse.Namespace) -> int:
    # First, before the 10-40 s of imports, data and DeepSpeed set-up: a SIGTERM/SIGINT from here on is a stop
    # request that `trainer.train.run.main` honours at its first safe point, never a half-written job dir.
    from trainer.runtime import follow_launcher, launcher_note
    from trainer.train.checkpoint import StopRequest

    stop = _early_stop or StopRequest().install()
    follow_launcher()
    from trainer.train.validate import load_checked  # every config problem, registry checks included, before any work

    if (note := launcher_note()) and os.environ.get("RANK", "0") == "0":
        print(f"terrascale: warning: {note}", file=sys.stderr)
    try:
        exp = load_checked(args.config, args.overrides)  # before trainer.train.run's imports (torch, accelerate)
        from trainer.train.run import main

        try:
            return main(exp, stop)
        except OSError as e:  # a full disk outside a checkpoint save: said with the job dir it was writing into
            from trainer import diskspace

            if diskspace.is_disk_full(e):
                raise diskspace.write_failed(e, exp.job_dir) from e
            raise
    finally:
        stop.uninstall()


def _stats(args: argparse.Namespace) -> int:
    from trainer.config import load_experiment
    from trainer.data.stats import write_stats_for

    path = write_stats_for(load_experiment(args.config, args.overrides), force=args.force)
    print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.config import DEMO_CONFIG, load_experiment
    from trainer.errors import ConfigError

    out = Path(args.out) / f"{args.what}.json"
    if args.what == "planner":
        from trainer.plan import plan_bench
        if args.config or args.overrides:
            raise ConfigError(["bench planner plans the fit table's experiment of each catalog backbone and every "
                               "shipped config: it takes no --config or overrides (choose rows with --backbones)"])
        doc = plan_bench.run(out, backbones=args.backbones, cold=not args.warm_only)
        print(plan_bench.summary(doc) + f"\nwritten to {out}")
        return 0
    if args.what == "chaos":
        from trainer.bench import bench_chaos
        return bench_chaos.main(args.config, args.overrides, args.kills, args.seed, args.processes, out, args.budget)
    if args.what == "load":
        from trainer.bench import bench_load
        if args.config or args.overrides:
            raise ConfigError(["bench load runs launch/configs/internvl2_26b_forest.yaml on synthetic InternVL2-40B "
                               "checkpoints: it takes no --config or overrides (choose --depths/--profiles/--layout)"])
        out = Path(args.out) if args.out.endswith(".json") else out
        doc = bench_load.run(args.depths, args.profiles, args.layout, out, Path(args.scratch), keep=args.keep)
        print(bench_load.markdown(doc) + f"written to {out} and {out.with_suffix('.md')}")
        return 0 if all(r["exit_code"] == 0 for r in doc["runs"]) else 1
    if args.what == "compare":
        from trainer.bench import compare
        if not args.config:
            raise ConfigError(["bench compare: give --config SPEC.yaml (a `compare:` section; example: "
                               "launch/configs/compare/forest_tiny.yaml)"])
        doc = compare.run_compare(Path(args.config), args.overrides)
        out_dir = Path(compare.load_spec(Path(args.config)).dir)
        print(compare.markdown(doc) + f"written to {out_dir}/compare.{{md,csv,json,png}}")
        return 0 if all(r["status"] == "done" and not r.get("error") for r in doc["rows"]) else 1
    if args.what == "predict":
        from trainer.bench import bench_predict
        if args.config or args.overrides:
            raise ConfigError(["bench predict trains its own small jobs (the tiny variants of shipped configs, a "
                               "real-width reduced-depth checkpoint): it takes no --config or overrides (choose "
                               "--cases tiny realwidth, --depths, --windows, --window-batch)"])
        if args.windows < 2 or args.window_batch < 1:
            raise ConfigError([f"--windows {args.windows} --window-batch {args.window_batch}: need windows >= 2 "
                               "(the rate is the difference of a 1-window and a N-window scene) and batch >= 1"])
        out = Path(args.out) if args.out.endswith(".json") else out
        doc = bench_predict.run(args.cases, out, Path(args.scratch), args.windows, args.window_batch,
                                args.depths[0], args.train_steps)
        print(bench_predict.markdown(doc) + f"written to {out} and {out.with_suffix('.md')}")
        return 0 if all(r["status"] == "ok" for r in doc["results"]) else 1
    from trainer.bench import bench
    exp = load_experiment(args.config or DEMO_CONFIG, args.overrides)
    if args.what == "overhead":
        r = bench.overhead(exp, steps=args.steps, rounds=args.rounds, warmup=args.warmup, out=out)
        print(f"loop overhead: ours {r['ours_median_s']:.3f} s vs plain Accelerate {r['plain_median_s']:.3f} s "
              f"for {args.steps} steps -> {r['ratio']:.3f}x (target <= 1.05x); written to {out}")
    elif args.what == "optimizer":
        r = bench.optimizer_step(args.params, args.rounds, out)
        print("offloaded optimizer step, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in r["median_ms"].items())
              + f"; chosen {r['chosen']} = {r['chosen_vs_best']:.2f}x best, "
              f"{r['chosen_vs_foreach_speedup']:.1f}x faster than foreach; written to {out}")
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
    b = sub.add_parser("bench", help="benchmarks; results are written to files under --out",
                       description="overhead: our loop vs a plain hand-written Accelerate loop on the same model "
                       "and data, interleaved in one process; writes the ratio (target <= 1.05x). optimizer: the "
                       "CPU optimizer step of offloaded parameters, DeepSpeedCPUAdam vs torch AdamW foreach/fused. "
                       "planner: wall time and peak RSS of `launch/plan.py` for every catalog backbone and shipped "
                       "config, each in a fresh process, warm (shipped trace cache) and cold (nothing cached). "
                       "chaos: kill -9 a small job N times (some during checkpoint saves and the export), re-run it "
                       "until it finishes, compare its export bitwise to a straight run's (exit 1 if not equal); "
                       "overrides go right after the benchmark name. load: peak RSS and seconds of loading synthetic real-width "
                       "InternVL2-40B checkpoints of a few depths through `launch/train.py` (one step), per profile. "
                       "predict: windows/s and peak RSS of `predict` on this host for small trained jobs (tiny "
                       "variants, a real-width reduced-depth InternVL2-40B checkpoint), beside the planner's "
                       "inference estimate for the same model (`launch/plan.py --inference`). "
                       "compare: one task and data over a list of backbones, frozen-backbone probe and LoRA, "
                       "through the sweep (--config SPEC.yaml with a `compare:` section, e.g. "
                       "launch/configs/compare/forest_tiny.yaml; overrides apply to every job): one table "
                       "(md/csv/json) and one chart of validation metric, trainable parameters, planned and "
                       "measured memory, training and inference speed.",
                       epilog=EPILOG_OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("what", choices=["overhead", "optimizer", "planner", "chaos", "load", "predict", "compare"], help="which benchmark")
    _add_config(b, required=False)
    b.add_argument("--steps", type=int, default=30, help="training steps per timed round (default 30)")
    b.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are compared (default 5)")
    b.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per loop (default 5)")
    b.add_argument("--params", type=int, default=100_000_000, help="optimizer: parameters stepped (default 100M)")
    b.add_argument("--backbones", nargs="+", metavar="NAME", help="planner: only these catalog backbones "
                   "(their fit-table rows and the shipped configs that use them; default: all)")
    b.add_argument("--warm-only", action="store_true", help="planner: skip the cold (nothing cached) runs")
    b.add_argument("--kills", type=int, default=20, help="chaos: kill -9 this many times (default 20)")
    b.add_argument("--seed", type=int, default=0, help="chaos: seed of the kill plan and moments (default 0)")
    b.add_argument("--processes", type=int, default=1, help="chaos: processes of the job (default 1)")
    b.add_argument("--budget", type=float, default=2400, help="chaos: seconds after which no more kills are "
                   "sent and the job is left to finish (default 2400)")
    b.add_argument("--depths", type=int, nargs="+", default=[1, 2], help="load: vision = LLM layers (default 1 2)")
    b.add_argument("--profiles", nargs="+", default=["qlora", "zero3_offload_lora"], help="load: memory profiles")
    b.add_argument("--layout", choices=["native", "remote"], default="native", help="load: checkpoint layout")
    b.add_argument("--scratch", default="bench_scratch", help="load: where checkpoints and jobs go (deleted)")
    b.add_argument("--keep", action="store_true", help="load: keep the written checkpoints")
    b.add_argument("--cases", nargs="+", choices=["tiny", "realwidth"], default=["tiny", "realwidth"],
                   help="predict: which jobs (default both; realwidth uses the first of --depths)")
    b.add_argument("--windows", type=int, default=8, help="predict: windows in the long scene (default 8)")
    b.add_argument("--window-batch", type=int, default=4, help="predict: windows per forward pass (default 4)")
    b.add_argument("--train-steps", type=int, default=2, help="predict: training steps of each job (default 2)")
    b.add_argument("--out", default="bench_results", help="results folder, or a .json file (default bench_results/)")
    b.set_defaults(func=_bench)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


# Modules that add their own subcommands with `add_parser(subparsers)`; each must be cheap to import
# (no TerraTorch, DeepSpeed or Accelerate at module level) so that `--help` and `plan` stay fast.
COMMAND_MODULES: list[str] = ["trainer.cli.export", "trainer.cli.universal", "trainer.cli.sweep",
                              "trainer.cli.bench_report", "trainer.cli.plan", "trainer.cli.predict"]


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
    except OSError as e:  # a full disk in any command: the same message and exit code as during a save
        from trainer import diskspace

        if not diskspace.is_disk_full(e):
            raise
        err = diskspace.write_failed(e)
        report_error(err)
        return err.exit_code
    except KeyboardInterrupt:  # the second Ctrl-C: abort now; a save it cut short stays an ignored .tmp
        report_error(TerrascaleError("aborted by a second interrupt; the newest complete checkpoint is intact"))
        return EXIT_ABORTED



_early_stop = None  # set by run_launcher("train") before anything else is imported


def run_launcher(command: str) -> None:
    """Entry for `launch/<command>.py`: same parser, same exit codes."""
    global _early_stop
    from trainer.runtime import pause_gc_for_start_up

    pause_gc_for_start_up(command)
    if command == "train":
        from trainer.train.checkpoint import StopRequest

        _early_stop = StopRequest().install()
    sys.exit(main([command, *sys.argv[1:]]))


def entry() -> None:
    """Entry for the `terrascale` script and `python -m trainer`."""
    from trainer.runtime import pause_gc_for_start_up

    pause_gc_for_start_up(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.exit(main())
