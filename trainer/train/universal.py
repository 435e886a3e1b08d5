"""Resume a DeepSpeed job with a different number of processes, through DeepSpeed's universal checkpoints.

A ZeRO checkpoint is sharded by rank: 2 ranks write 2 optimizer shards, and DeepSpeed refuses to load them into
1 or 4 ranks. `terrascale universal <step dir>` runs DeepSpeed's own converter (`ds_to_universal`) once; it
writes, beside the original, a topology-free copy (one folder per parameter: fp32 weights and Adam moments):

    checkpoints/step-000300/                  the checkpoint as saved (N ranks), still resumable by N ranks
    checkpoints/step-000300/universal/        complete Accelerate state dir: pytorch_model/ (universal format),
                                              latest_universal, the scheduler/RNG/progress files, COMPLETE

The same training command with M processes then finds the converted copy (`needs_universal`), renders the
DeepSpeed config with `checkpoint.load_universal: true` (`with_load_universal`) and loads it through
Accelerate's `load_state` (`load_universal`): DeepSpeed re-partitions every parameter for the new world size.

Imports stay cheap at module level (the CLI lists commands without importing DeepSpeed).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointError
from trainer.train.checkpoint import MARKER, PROGRESS_FILE, Progress, is_complete

log = logging.getLogger(__name__)

UNIVERSAL_SUBDIR = "universal"
# Accelerate's `save_state` hands DeepSpeed this tag for the first model (accelerate.utils.MODEL_NAME).
DS_TAG = "pytorch_model"
# Top-level files of a step dir that belong to DeepSpeed's sharded layout, not to the universal copy.
_NOT_COPIED = {"latest", "zero_to_fp32.py", "zero_to_torch.py", MARKER}


def universal_dir(step_dir: Path) -> Path:
    return Path(step_dir) / UNIVERSAL_SUBDIR


def is_converted(step_dir: Path) -> bool:
    return (universal_dir(step_dir) / MARKER).is_file()


def _ds_shards(step_dir: Path) -> list[Path]:
    return sorted((Path(step_dir) / DS_TAG).glob("*_optim_states.pt"))


def convert(step_dir: Path, workers: int = 1, force: bool = False) -> Path:
    """Write `<step dir>/universal/` with DeepSpeed's `ds_to_universal`; returns it. Idempotent.

    `workers` > 1 extracts shards in parallel processes (each holds one rank's optimizer states in RAM).
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointError(f"{step_dir} does not exist; give a checkpoint dir such as runs/<job>/checkpoints/"
                              "step-000300")
    if not is_complete(step_dir):
        raise CheckpointError(f"{step_dir} is not a complete checkpoint (no {MARKER} marker or {PROGRESS_FILE}); "
                              "convert an older one")
    if not _ds_shards(step_dir):
        raise CheckpointError(
            f"{step_dir} holds no DeepSpeed ZeRO shards ({DS_TAG}/*_optim_states.pt): it was written without "
            "DeepSpeed, so there is nothing to convert; only ZeRO checkpoints are tied to the number of processes")
    out = universal_dir(step_dir)
    if is_converted(step_dir) and not force:
        log.info("%s is already converted (use --force to redo it)", out)
        return out
    tmp = step_dir / f"{UNIVERSAL_SUBDIR}.tmp"
    if tmp.exists():  # left by a conversion that was killed
        shutil.rmtree(tmp)
    tmp.mkdir()
    _run_ds_to_universal(step_dir / DS_TAG, tmp / DS_TAG, workers)
    for f in step_dir.iterdir():
        if f.is_file() and f.name not in _NOT_COPIED:
            shutil.copy2(f, tmp / f.name)
    (tmp / MARKER).write_text(f"{step_dir.name} universal\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _run_ds_to_universal(src: Path, dst: Path, workers: int) -> None:
    """DeepSpeed's converter is a script: `main(args)` with its argparse namespace. We build that namespace
    from its own parser so that a DeepSpeed release adding an option keeps its default here."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["--input_folder", str(src), "--output_folder", str(dst),
            "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
            # Models outside Megatron carry no UNIVERSAL_CHECKPOINT_INFO; ZeRO-1/2 conversion asserts on it.
            "--inject_missing_state"]
    import pickle

    from trainer.train.ckpt_state import refused_message, safe_loading

    args = _parse_converter_args(ds_to_universal, argv)
    try:
        with safe_loading():  # the converter reads the shards with weights_only=False: forced to True
            ds_to_universal.main(args)
    except pickle.UnpicklingError as e:
        raise CheckpointError(refused_message(src, e)) from e
    except (FileNotFoundError, RuntimeError, ValueError, KeyError, AssertionError, NotImplementedError) as e:
        raise CheckpointError(f"{src}: DeepSpeed could not convert this checkpoint to the universal format "
                              f"({type(e).__name__}: {e})") from e


def _parse_converter_args(module, argv: list[str]) -> argparse.Namespace:
    import sys

    saved = sys.argv
    sys.argv = ["ds_to_universal", *argv]
    try:
        return module.parse_arguments()
    finally:
        sys.argv = saved


# --- resuming ------------------------------------------------------------------------------------------


def needs_universal(step_dir: Path | None, world_size: int) -> bool:
    """True when `step_dir` was written by another number of processes and has a converted copy.

    Raises, before any model is built, when the number differs and nothing was converted.
    """
    if step_dir is None:
        return False
    saved = Progress.from_file(Path(step_dir) / PROGRESS_FILE).world_size
    if saved == world_size:
        return False
    if is_converted(step_dir):
        return True
    hint = (f"convert it first: `terrascale universal {step_dir}` (DeepSpeed universal checkpoint), then run "
            "this command again" if _ds_shards(step_dir) else
            f"resume with {saved} process(es): this checkpoint holds no DeepSpeed shards to convert")
    raise CheckpointError(f"{step_dir} was written by {saved} process(es) but this run has {world_size}; {hint}")


def with_load_universal(ds_config: dict[str, Any] | None) -> dict[str, Any]:
    """The rendered DeepSpeed config, told to read universal checkpoints (`checkpoint.load_universal`)."""
    if ds_config is None:
        raise CheckpointError("a universal checkpoint can only be loaded under DeepSpeed: choose a memory.profile "
                              "with a ZeRO preset (the one the job was trained with)")
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def rescale_progress(progress: Progress, world_size: int, grad_accum: int) -> Progress:
    """Carry the data position over to another number of processes.

    Steps, epochs and samples seen are global and stay. `batch_in_epoch` counts one rank's micro-batches; ranks
    take interleaved batches of one permutation, so `batch_in_epoch × old world` batches of this epoch are
    consumed. Spread over the new world and rounded down to whole optimizer steps: exact when divisible,
    otherwise at most `grad_accum × world` micro-batches of this epoch are seen a second time.
    """
    consumed = progress.batch_in_epoch * progress.world_size
    per_rank = consumed // world_size
    per_rank -= per_rank % grad_accum
    return replace(progress, batch_in_epoch=per_rank, world_size=world_size)


def load_universal(accelerator, model, step_dir: Path, grad_accum: int, scheduler=None) -> Progress:
    """Collective. Loads `<step dir>/universal/` into a DeepSpeed engine built with `load_universal: true`.
    Every pickle-format file is read by torch's weights-only unpickler (trainer.train.ckpt_state.safe_loading)."""
    import pickle

    from accelerate.utils import DistributedType

    from trainer.train import ckpt_state
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise CheckpointError(f"{step_dir}: a universal checkpoint needs DeepSpeed; this run has none")
    source = universal_dir(step_dir)
    progress = Progress.from_file(source / PROGRESS_FILE)
    ckpt_state.refuse_custom_pickles(source)
    try:
        with ckpt_state.safe_loading():
            accelerator.load_state(str(source))
            restored = _restore_buffers(model, source / DS_TAG, accelerator.process_index)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        if ckpt_state.is_refused_pickle(e):
            raise CheckpointError(ckpt_state.refused_message(source, e)) from e
        raise CheckpointError(f"{source}: cannot load the universal checkpoint ({e})") from e
    # The random state is per rank: with another number of processes, rank r takes rank r's if it existed.
    if (source / ckpt_state.RNG_FILE.format(accelerator.process_index)).is_file():
        ckpt_state.load_rng(source, accelerator.process_index)
    if scheduler is not None:
        ckpt_state.load_scheduler(source, scheduler)
    new = rescale_progress(progress, accelerator.num_processes, grad_accum)
    log.info("loaded universal checkpoint %s (written by %d process(es), now %d; %d buffers): step %d, batch %d of "
             "epoch %d", source, progress.world_size, new.world_size, restored, new.step, new.batch_in_epoch,
             new.epoch)
    return new


def _restore_buffers(model, tag_dir: Path, rank: int) -> int:
    """DeepSpeed's universal load restores parameters and optimizer states (`zero/`) but skips the module state
    dict, so buffers (BatchNorm running statistics) would silently stay as built. They are in the model-states
    files: each rank keeps its own under ZeRO-3 (BatchNorm is not synchronized), so a rank takes its old
    rank's file, or rank 0's when the job grew."""
    import torch

    own = tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    files = [own] if own.is_file() else sorted(tag_dir.glob("*model_states.pt"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise FileNotFoundError(f"no model-states file in {tag_dir}")
    state = torch.load(files[0], map_location="cpu", weights_only=True)  # allow-list: ckpt_state.safe_loading
    saved = state["module"]
    module = getattr(model, "module", model)  # the DeepSpeed engine wraps the model
    count = 0
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in state.get("buffer_names", ()) and name in saved:
                buf.copy_(saved[name])
                count += 1
    return count
