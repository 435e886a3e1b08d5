"""`terrascale export --job runs/x [--checkpoint runs/x/checkpoints/step-000200]`: write a job's exports
from a checkpoint (e.g. after a run that was stopped early), without training."""
from __future__ import annotations

import argparse
from pathlib import Path


def export_from_checkpoint(job_dir: Path, checkpoint: str | None, overrides: list[str]) -> Path | None:
    from trainer.config import load_experiment
    from trainer.errors import CheckpointError
    from trainer.train.checkpoint import find_resume, load_checkpoint
    from trainer.train.export import export_job, export_metadata
    from trainer.train.run import shutdown_job, setup

    config = job_dir / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{job_dir} has no config.yaml: point --job at a terrascale job directory")
    exp = load_experiment(config, overrides)
    ckpt = find_resume(job_dir, checkpoint or "auto")
    if ckpt is None:
        raise CheckpointError(f"{job_dir} holds no complete checkpoint to export")
    job = setup(exp)
    progress = load_checkpoint(job.accelerator, ckpt, job.frozen_excluded)
    out = export_job(job.accelerator, job.model, exp, job.profile, job.precision, job.zero_stage,
                     job_dir / "export", export_metadata(exp, job.profile.name, progress.step))
    shutdown_job(job.accelerator)
    return out


def merge_export(export: Path, base: str | None = None) -> Path:
    """model.merged.safetensors (bf16) beside the export, from the model as trained; see trainer.train.merge."""
    from trainer.predict.inference import load_for_inference
    from trainer.train.export import MERGED_FILE, export_metadata, read_manifest
    from trainer.train.merge import write_merged

    manifest = read_manifest(export)
    im = load_for_inference(export, device="cpu", base=base)
    out = export / MERGED_FILE
    write_merged(im.model, out, export_metadata(im.exp, manifest.get("profile"), manifest.get("step")))
    return out


def _run(args: argparse.Namespace) -> int:
    from trainer.train.export import is_exported

    job = Path(args.job)
    export = job / "export"
    out = None
    if args.checkpoint or args.overrides or not (args.merge and is_exported(export)):
        out = export_from_checkpoint(job, args.checkpoint, args.overrides)
        if out is not None:
            print(f"exported {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    if args.merge and (out is not None or is_exported(export)):
        print(f"wrote {merge_export(export, args.base)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a job's exports (weights, or adapters + head; --merge) from a checkpoint",
                       description="Load a job's checkpoint (newest complete one, or --checkpoint) and write export/: "
                       "full profiles: the consolidated weights (gathered from ZeRO-3); LoRA/QLoRA: the adapters (peft) "
                       "and every tensor the base checkpoint does not hold, with the base's fingerprint. --merge also "
                       "writes model.merged.safetensors: adapters merged into the base as trained (QLoRA: NF4 "
                       "dequantized), bf16, size stated before writing; with an existing export and no --checkpoint "
                       "it merges that export without re-exporting.")
    p.add_argument("--job", required=True, help="job directory (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a step-XXXXXX directory (default: the newest complete one)")
    p.add_argument("--merge", action="store_true", help="also write the merged bf16 model (large: the whole "
                   "backbone; predict does not need it)")
    p.add_argument("--base", metavar="DIR", help="with --merge: the base checkpoint, if it moved from the job's "
                   "pretrained_path (fingerprint checked)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the job's config")
    p.set_defaults(func=_run)
