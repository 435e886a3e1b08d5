"""Exports at the end of a job (and by `terrascale export`), per profile.

    export/model.safetensors         the trained state as it is (gathered from ZeRO-3 shards)
    export/adapter/                  LoRA profiles: peft `save_pretrained` of the backbone adapters (small)
    export/model.merged.safetensors  LoRA profiles: adapters merged into the (dequantized) backbone; loads
                                     into a plain `build_model(exp)` with no peft or bitsandbytes
    export/config.yaml               the experiment, to rebuild the model (predict, export)
    export/stats.json                the per-band normalization the model was trained with

Everything is written under a temporary name and renamed.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Experiment, dump_experiment
from trainer.memory.profiles import Profile

log = logging.getLogger(__name__)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def merged_model(trained: nn.Module) -> nn.Module:
    """A copy of `trained` with 4-bit/8-bit layers dequantized and LoRA merged; the original is untouched."""
    from trainer.fitting import dequantize_linears

    model = copy.deepcopy(trained).cpu()
    dequantize_linears(model)
    if hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()
    return model.float()


def _rebuild_with_state(exp: Experiment, profile: Profile, state: dict[str, torch.Tensor]) -> nn.Module:
    """ZeRO-3 keeps no whole model on any rank: rebuild one on CPU (LoRA, no quantization) and load the
    gathered state into it."""
    from dataclasses import replace

    from trainer.fitting import apply_profile
    from trainer.models import build_model

    model = apply_profile(build_model(exp), replace(profile, quantization="none", grad_checkpointing=False),
                          torch.float32, zero_stage=0)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"gathered state does not fit the rebuilt model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model


def stats_file(exp: Experiment) -> Path | None:
    """The normalization stats the job trained with (predict needs the same ones)."""
    if exp.data.kind == "terratorch" or exp.terratorch is not None:
        return None
    path = Path(exp.data.stats) if exp.data.stats else Path(exp.data.root) / "stats.json"
    return path if path.is_file() else None


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the complete `tmp` with renames only: at any kill, `out_dir` is either the whole old
    export, the whole new one, or absent (the next run of the job exports again); never half of either."""
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_job(accelerator, model: nn.Module, exp: Experiment, profile: Profile, zero_stage: int,
               out_dir: Path, metadata: dict[str, Any]) -> Path | None:
    """Collective (ZeRO-3 gathers on every rank). Returns the export dir on rank 0."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors(state, tmp / "model.safetensors", metadata)
    if profile.lora is not None:
        if zero_stage == 3:
            if profile.quantization != "none":
                log.warning("merged export skipped: 4-bit weights under ZeRO-3 are gathered packed; the adapters "
                            "and model.safetensors are exported")
                trained = None
            else:
                trained = _rebuild_with_state(exp, profile, state)
        else:
            trained = accelerator.unwrap_model(model)
        if trained is not None:
            trained.encoder.save_pretrained(str(tmp / "adapter"))
            merged = merged_model(trained)
            save_safetensors(merged.state_dict(), tmp / "model.merged.safetensors", {**metadata, "merged": True})
    (tmp / "config.yaml").write_text(dump_experiment(exp))
    if (stats := stats_file(exp)) is not None:
        shutil.copyfile(stats, tmp / "stats.json")
    _swap_into_place(tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def load_exported(exp: Experiment, export_dir: Path) -> nn.Module:
    """A plain model (no peft, no bitsandbytes) with the exported weights: merged ones when present."""
    from safetensors.torch import load_file

    from trainer.models import build_model

    merged = export_dir / "model.merged.safetensors"
    path = merged if merged.is_file() else export_dir / "model.safetensors"
    model = build_model(exp)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
