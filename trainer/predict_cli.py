"""`terrascale predict` / `launch/predict.py`: sliding-window inference of a trained job over a GeoTIFF scene.

Cheap to import on purpose (`trainer.cli` imports it to build `--help`): the work is in `trainer.predict`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Predict a whole scene with a trained job: sliding windows of --tile px overlapping by --overlap px, blended
with a tapered-cosine weight, read and written window by window (memory does not grow with the scene's height).
Writes a GeoTIFF with the input's CRS and transform (class ids uint8 with nodata 255; --probabilities: one
float32 band per class; regression: coherence float32, NaN nodata) and a PNG quicklook beside it.

The model and its normalization come from the job's export/ (config.yaml, model[.merged].safetensors,
stats.json). Change detection takes one file per date, in date order."""

EPILOG = """\
examples:
  python launch/predict.py --job runs/demo --input scene.tif --out pred.tif
  python launch/predict.py --job runs/change/export --input t0.tif --input2 t1.tif --out change.tif --probabilities
Bad input (unreadable file, no CRS, wrong band count, dates not on one grid) exits 2 and writes nothing."""


def _predict(args: argparse.Namespace) -> int:
    import logging

    from trainer.predict import predict_scene
    from trainer.runtime import quiet_libraries

    # Not runtime.setup_logging: that one imports DeepSpeed (seconds), which inference never uses.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    quiet_libraries()
    inputs = [*args.input, *(args.input2 or [])]
    out = Path(args.out)
    quicklook = None if args.no_quicklook else Path(args.quicklook or out.with_suffix(".png"))
    result = predict_scene(Path(args.job), inputs, out, tile=args.tile, overlap=args.overlap,
                           batch_size=args.batch_size, probabilities=args.probabilities, quicklook=quicklook)
    print(f"wrote {result.out} ({result.shape[0]}x{result.shape[1]} px, {result.windows} windows)"
          + (f" and {result.quicklook}" if result.quicklook else ""))
    return 0


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
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--probabilities", action="store_true",
                   help="write class probabilities (float32, one band per class) instead of class ids")
    p.add_argument("--quicklook", help="PNG quicklook path (default: --out with .png)")
    p.add_argument("--no-quicklook", action="store_true", help="skip the PNG quicklook")
    p.set_defaults(func=_predict)
    return p
