"""Exports at the end of a job (and by `terrascale export`), per profile.

Full-weight profiles (full, zero2, zero3, offload):
    export/model.safetensors         the trained state as it is (gathered from ZeRO-3 shards)
LoRA profiles (lora, qlora, zero3_offload_lora): only what the base checkpoint does not hold
    export/adapter/                  peft `save_pretrained` of the backbone adapters
    export/model.safetensors         every other tensor the model has and the base checkpoint does not provide:
                                     necks, decoder, head, backbone modules of ours (input adapter); names without
                                     peft's wrapping. With a `pretrained_path` base this is MBs; without one (a
                                     random backbone) it is the whole plain model, 4-bit layers dequantized
    export/export.json               kind, profile, trained precision, the base checkpoint's path and fingerprint
                                     (trainer.train.basehash), sizes; predict checks the fingerprint before loading
Every job:
    export/config.yaml               the experiment, to rebuild the model (predict, export)
    export/stats.json                the per-band normalization the model was trained with
On request (`terrascale export --merge`): export/model.merged.safetensors, adapters merged into the base, bf16,
written tensor by tensor (trainer.train.merge).

Everything is written under a temporary name and renamed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Experiment, dump_experiment
from trainer.memory.profiles import Profile

log = logging.getLogger(__name__)


def backbone_name(exp: Experiment) -> str:
    """The backbone an export (and a prediction's GeoTIFF tags) names: the native schema's `model.backbone`, a
    `terratorch fit` file's `model_args.backbone` (else "terratorch")."""
    if exp.terratorch is None:
        return exp.model.backbone
    init = exp.terratorch.config["model"].get("init_args") or {}
    return str((init.get("model_args") or {}).get("backbone", "terratorch"))


def export_metadata(exp: Experiment, profile: str | None, step: int | None) -> dict[str, Any]:
    """The metadata written into an export's safetensors files: at the end of a run, by `terrascale export` and
    into the merged model. `profile` and `step` are the job's, the ones export.json records (which `read_manifest`
    reads); the safetensors metadata itself is read back only to compare two exports (trainer.bench.bench_chaos)."""
    return {"backbone": backbone_name(exp), "step": step, "task": exp.task.name, "profile": profile}


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


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


EXPORT_JSON = "export.json"
ADAPTER_DIR = "adapter"
MODEL_FILE = "model.safetensors"
MERGED_FILE = "model.merged.safetensors"
_WEIGHT = re.compile(r"^(.*)\.weight(\..+)?$")  # a weight, or bitsandbytes' quant state beside it (weight.absmax, ...)


def plain_name(key: str) -> str:
    """A state key without peft's wrapping: the name the module has in a plain `build_model(exp)`."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def base_checkpoint(exp: Experiment) -> dict | None:
    """The backbone checkpoint a LoRA job's frozen base comes from (terrascale's streamed backbones), else None."""
    from trainer.backbones.factory import REGISTERED

    kw = exp.model.backbone_kwargs
    path = kw.get("pretrained_path") or exp.model.pretrained_path
    if not path or exp.model.backbone not in REGISTERED:
        return None
    return {"path": str(path), "allow_pickle": bool(kw.get("allow_pickle", False))}


def base_names(model: nn.Module, trained: bool = True) -> set[str]:
    """Plain names of the tensors the backbone's checkpoint load filled (trainer.backbones.loading.LoadReport) and,
    for a `trained` model, that stayed frozen: what a small export leaves out because the base provides it."""
    trainable = {plain_name(n) for n, p in model.named_parameters() if p.requires_grad} if trained else set()
    out: set[str] = set()
    for name, m in model.named_modules():
        report = getattr(m, "load_report", None)
        if report is None:
            continue
        prefix = plain_name(name + ".") if name else ""
        out |= {prefix + k for k in report.loaded}
    return out - trainable


def bnb_modules(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {plain_name(n + ".").rstrip("."): m for n, m in model.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def split_lora_state(state: dict[str, torch.Tensor], model: nn.Module | None, base: set[str]):
    """(adapter state relative to the encoder, the rest under plain names). The rest leaves out what `base` holds
    and adapter weights; a 4-bit/8-bit layer the base does not hold is stored dequantized (its packed form
    cannot be loaded back without bitsandbytes' quant state)."""
    from trainer.model.fitting import dequantized_weight

    bnb = bnb_modules(model) if model is not None else {}
    adapter, rest = {}, {}
    for key, value in state.items():
        if "lora_" in key:
            if key.startswith("encoder."):
                adapter[key.removeprefix("encoder.")] = value
            continue
        name = plain_name(key)
        m = _WEIGHT.match(name)
        owner = m[1] if m else None
        if owner in bnb:
            if owner + ".weight" in base or name != owner + ".weight":
                continue  # the base provides it, or a quant-state entry
            rest[name] = dequantized_weight(bnb[owner])
            continue
        if name in base:
            continue
        rest[name] = value
    return adapter, rest


def _gather_trained(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """ZeRO-3 LoRA with a base checkpoint: gather only the parameters the small export keeps (one at a time, every
    rank in the same order), never the frozen base (a 40B job's would be 80 GB on rank 0)."""
    import deepspeed

    module = accelerator.unwrap_model(model)
    skip = base_names(module)
    state = {k: v for k, v in module.state_dict().items() if k not in dict(module.named_parameters())}  # buffers
    for name, p in module.named_parameters():
        if plain_name(name) in skip and not p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p]):
            if accelerator.is_main_process:
                state[name] = p.data.detach().cpu().clone()
    return state


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_lora(tmp: Path, accelerator, model: nn.Module, state: dict, exp: Experiment, metadata: dict) -> dict:
    """adapter/ + model.safetensors (what the base does not hold) + the base's fingerprint."""
    from trainer.train.basehash import checkpoint_fingerprint

    trained = accelerator.unwrap_model(model)
    base = base_checkpoint(exp)
    names = base_names(trained) if base else set()
    if base and not names:
        log.warning("the backbone reports no tensors loaded from %s: the export holds the whole model", base["path"])
        base = None
    adapter, rest = split_lora_state(state, trained, names)
    # the state gathered above (ZeRO-3: from every rank's partitions) is what peft saves
    trained.encoder.save_pretrained(str(tmp / ADAPTER_DIR), state_dict=adapter)
    save_safetensors(rest, tmp / MODEL_FILE, metadata)
    if base:
        base.update(checkpoint_fingerprint(base["path"], base["allow_pickle"]))
    return {"kind": "lora", "base": base, "tensors": len(rest), "adapter_tensors": len(adapter),
            "params": sum(v.numel() for v in rest.values()) + sum(v.numel() for v in adapter.values())}


def export_job(accelerator, model: nn.Module, exp: Experiment, profile: Profile, precision: str, zero_stage: int,
               out_dir: Path, metadata: dict[str, Any]) -> Path | None:
    """Collective (ZeRO-3 gathers on every rank). Returns the export dir on rank 0. `precision`: what the run
    computed in (Job.precision), recorded in export.json."""
    if zero_stage == 3 and profile.lora is not None and base_checkpoint(exp) is not None:
        state = _gather_trained(accelerator, model)
    else:
        state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest: dict[str, Any] = {"format": 2, "profile": profile.name, "quantization": profile.quantization,
                                "precision": precision, "step": metadata.get("step")}
    if profile.lora is not None:
        manifest.update(_write_lora(tmp, accelerator, model, state, exp, metadata))
    else:
        save_safetensors(state, tmp / MODEL_FILE, metadata)
        manifest.update(kind="full", base=None, tensors=len(state), params=sum(v.numel() for v in state.values()))
    del state
    (tmp / "config.yaml").write_text(dump_experiment(exp))
    if (stats := stats_file(exp)) is not None:
        shutil.copyfile(stats, tmp / "stats.json")
    manifest["bytes"] = _dir_bytes(tmp)
    (tmp / EXPORT_JSON).write_text(json.dumps(manifest, indent=1) + "\n")
    _swap_into_place(tmp, out_dir)
    log.info("export: %s, %.1f MB%s", manifest["kind"], manifest["bytes"] / 1e6,
             f" (base checkpoint {manifest['base']['path']}, {manifest['base']['bytes'] / 1e9:.2f} GB, not copied)"
             if manifest.get("base") else "")
    accelerator.wait_for_everyone()
    return out_dir


def read_manifest(export_dir: Path) -> dict:
    """export.json; an export written before it existed is read as its files say (a full one, or merged LoRA)."""
    path = export_dir / EXPORT_JSON
    if path.is_file():
        return json.loads(path.read_text())
    merged = (export_dir / MERGED_FILE).is_file()
    return {"format": 1, "kind": "merged" if merged else "full", "base": None, "quantization": "none",
            "precision": "fp32"}


def is_exported(export_dir: Path) -> bool:
    """A complete export (the export dir is swapped in whole, so its files are there or it is absent)."""
    return (export_dir / "config.yaml").is_file() and (export_dir / MODEL_FILE).is_file()


def load_exported(exp: Experiment, export_dir: Path) -> nn.Module:
    """A plain model (no peft, no bitsandbytes) with the exported weights: merged ones when present."""
    from safetensors.torch import load_file

    from trainer.model.models import build_model

    merged = export_dir / "model.merged.safetensors"
    path = merged if merged.is_file() else export_dir / "model.safetensors"
    model = build_model(exp)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
