"""`terrascale predict` / `launch/predict.py`: sliding-window inference of a trained job over a GeoTIFF scene.

Cheap to import on purpose (`trainer.cli` imports it to build `--help`): the work is in `trainer.predict.predict`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Predict a whole scene with a trained job: sliding windows of --tile px overlapping by --overlap px, blended
with a tapered-cosine weight, read and written window by window (memory does not grow with the scene's height).
Writes a GeoTIFF with the input's CRS and transform (class ids uint8 with nodata 255; --probabilities: one
float32 band per class; regression: coherence float32, NaN nodata) and a PNG quicklook beside it.

The model and its normalization come from the job's export/ (config.yaml, export.json, stats.json). A LoRA/QLoRA
job's export holds only what training changed (adapters, necks, decoder, head): the frozen base is streamed from
the checkpoint the job trained on (its pretrained_path, or --base), refused (exit 2) unless its fingerprint is the
one recorded at export, and held at --precision: nf4 or int8 (quantized while it loads), bf16 or fp32. Default:
what the job trained with. Change detection takes one file per date, in date order.

A job trained from a `terratorch fit` file: the task's model rebuilt by TerraTorch with the exported weights, fp32;
each window prepared as its GenericNonGeoSegmentation/PixelwiseRegression datamodule prepared tiles (bands,
constant_scale, no_data_replace, means/stds from data.init_args); regression values are the model's own."""

EPILOG = """\
examples:
  python launch/predict.py --job runs/demo --input scene.tif --out pred.tif
  python launch/predict.py --job runs/change/export --input t0.tif --input2 t1.tif --out change.tif --probabilities
  python launch/predict.py --job runs/internvl2_40b_forest --precision nf4 --base /models/InternVL2-40B \\
      --input scene.tif --out forest.tif
Bad input (unreadable file, no CRS, wrong band count, dates not on one grid) exits 2 and writes nothing."""


def _predict(args: argparse.Namespace) -> int:
    import logging

    from trainer.predict.predict import predict_scene
    from trainer.runtime import quiet_libraries

    # Not runtime.setup_logging: that one imports DeepSpeed (seconds), which inference never uses.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    quiet_libraries()
    inputs = [*args.input, *(args.input2 or [])]
    out = Path(args.out)
    quicklook = None if args.no_quicklook else Path(args.quicklook or out.with_suffix(".png"))
    batch = None if args.batch_size == "auto" else _positive_int(args.batch_size)
    result = predict_scene(Path(args.job), inputs, out, tile=args.tile, overlap=args.overlap, batch_size=batch,
                           probabilities=args.probabilities, quicklook=quicklook, precision=args.precision,
                           base=args.base)
    print(f"wrote {result.out} ({result.shape[0]}x{result.shape[1]} px, {result.windows} windows, {result.precision}, "
          f"{result.batch_size} per batch, {result.windows / max(result.seconds, 1e-9):.2f} windows/s)"
          + (f" and {result.quicklook}" if result.quicklook else ""))
    return 0


def _positive_int(value: str) -> int:
    from trainer.errors import ConfigError

    try:
        return int(value)
    except ValueError:
        raise ConfigError([f"--batch-size {value!r}: a number of windows or auto"]) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="sliding-window inference of a trained job over a GeoTIFF scene",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, help="a job dir (runs/<job>) or its export/ dir")
    p.add_argument("--input", required=True, nargs="+", metavar="TIF",
                   help="the scene; for change detection the first date (or every date, in order)")
    p.add_argument("--input2", action="append", metavar="TIF",
                   help="the next date for change detection; repeat for further dates, in order")
    p.add_argument("--out", required=True, help="output GeoTIFF (written under a temporary name, then renamed)")
    p.add_argument("--tile", type=int, default=64, help="window size in px (default 64)")
    p.add_argument("--overlap", type=int, default=16, help="overlap of neighbouring windows in px, <= tile/2 "
                   "(default 16)")
    p.add_argument("--batch-size", default="auto", help="windows per forward pass, or auto: as many as fit the "
                   "device (weights + one window's activations without gradients; default auto)")
    p.add_argument("--precision", choices=["nf4", "int8", "bf16", "fp32"],
                   help="backbone weights: nf4/int8 quantized at load, bf16 or fp32 (default: what the job trained "
                   "with; fp32 for an fp16 job)")
    p.add_argument("--base", metavar="DIR", help="the base checkpoint of a LoRA/QLoRA job, if it moved from the "
                   "job's pretrained_path (its fingerprint must match the export's)")
    p.add_argument("--probabilities", action="store_true",
                   help="write class probabilities (float32, one band per class) instead of class ids")
    p.add_argument("--quicklook", help="PNG quicklook path (default: --out with .png)")
    p.add_argument("--no-quicklook", action="store_true", help="skip the PNG quicklook")
    p.set_defaults(func=_predict)
    return p
