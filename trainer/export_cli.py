"""`terrascale export --job runs/x [--checkpoint runs/x/checkpoints/step-000200]`: write a job's exports
from a checkpoint (e.g. after a run that was stopped early), without training."""
from __future__ import annotations

import argparse
from pathlib import Path


def export_from_checkpoint(job_dir: Path, checkpoint: str | None, overrides: list[str]) -> Path | None:
    from trainer.checkpoint import find_resume, load_checkpoint
    from trainer.config import load_experiment
    from trainer.errors import CheckpointError
    from trainer.export import export_job
    from trainer.run import _shutdown, setup

    config = job_dir / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{job_dir} has no config.yaml: point --job at a terrascale job directory")
    exp = load_experiment(config, overrides)
    ckpt = find_resume(job_dir, checkpoint or "auto")
    if ckpt is None:
        raise CheckpointError(f"{job_dir} holds no complete checkpoint to export")
    job = setup(exp)
    progress = load_checkpoint(job.accelerator, ckpt, job.frozen_excluded)
    out = export_job(job.accelerator, job.model, exp, job.profile, job.zero_stage, job_dir / "export",
                     {"backbone": exp.model.backbone, "step": progress.step, "task": exp.task.name,
                      "profile": job.profile.name})
    _shutdown(job.accelerator)
    return out


def _run(args: argparse.Namespace) -> int:
    out = export_from_checkpoint(Path(args.job), args.checkpoint, args.overrides)
    if out is not None:
        print(f"exported {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a job's exports (safetensors, adapters, merged) from a checkpoint",
                       description="Load a job's checkpoint (newest complete one, or --checkpoint) and write "
                       "export/: consolidated weights (gathered from ZeRO-3), LoRA adapters and merged weights.")
    p.add_argument("--job", required=True, help="job directory (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a step-XXXXXX directory (default: the newest complete one)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the job's config")
    p.set_defaults(func=_run)
