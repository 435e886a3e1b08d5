"""`terrascale export --merge`: adapters merged into the base, one bf16 safetensors file, written tensor by tensor.

The model is the job's export loaded as trained (`trainer.predict.inference.load_for_inference` at the job's own
precision: a QLoRA job's NF4 base, which is what its adapters were trained against). Each adapted or quantized
linear is dequantized, its LoRA delta added in fp32 and the sum cast to bf16 only when it is written: at most
one full-size tensor exists beside the loaded model, never a dequantized copy of the whole backbone. The file's
size is known from the header before any data is written; it is stated, checked against the free disk space,
and the file goes to a temporary name, renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer.errors import DataError

log = logging.getLogger(__name__)
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64",
             torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

Entry = tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def _linear_entries(name: str, module: nn.Module) -> list[Entry]:
    from trainer.model.fitting import dequantized_weight

    base = getattr(module, "base_layer", module)
    is_bnb = type(base).__module__.startswith("bitsandbytes")

    def weight() -> torch.Tensor:
        w = (dequantized_weight(base) if is_bnb else base.weight.data).float()
        if base is not module and not getattr(module, "merged", False):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    w = w + module.get_delta_weight(adapter).float()
        return w.to(torch.bfloat16)

    out: list[Entry] = [(f"{name}.weight", (base.out_features, base.in_features), torch.bfloat16, weight)]
    if base.bias is not None:
        out.append((f"{name}.bias", tuple(base.bias.shape), torch.bfloat16, lambda: base.bias.data.to(torch.bfloat16)))
    return out


def merged_entries(model: nn.Module) -> list[Entry]:
    """(plain name, shape, dtype, producer) for every tensor of the merged plain model."""
    from peft.tuners.lora import LoraLayer

    from trainer.train.export import bnb_modules, plain_name

    handled: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            handled[plain_name(name + ".").rstrip(".")] = m
    for name, m in bnb_modules(model).items():
        handled.setdefault(name, m)
    entries: list[Entry] = []
    for name, m in handled.items():
        entries += _linear_entries(name, m)
    for key, t in model.state_dict(keep_vars=True).items():
        name = plain_name(key)
        if "lora_" in key or any(name.startswith(h + ".") for h in _owners(name, handled)):
            continue
        dtype = torch.bfloat16 if t.is_floating_point() else t.dtype
        entries.append((name, tuple(t.shape), dtype, lambda t=t, d=dtype: t.data.to(d)))
    return entries


def _owners(name: str, handled: dict) -> list[str]:
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in handled]


def _header(entries: list[Entry], metadata: dict) -> tuple[bytes, int]:
    header, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
    for name, shape, dtype, _ in entries:
        n = 1
        for s in shape:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, offset


def write_merged(model: nn.Module, path: Path, metadata: dict | None = None, announce=print) -> int:
    """Write the merged bf16 model to `path` tensor by tensor; returns its size in bytes."""
    from tqdm.auto import tqdm

    entries = sorted(merged_entries(model), key=lambda e: e[0])
    raw, data = _header(entries, {**(metadata or {}), "merged": True, "dtype": "bf16"})
    total = 8 + len(raw) + data
    free = shutil.disk_usage(path.parent).free
    announce(f"merged export: {total / 1e9:.2f} GB (bf16, {len(entries)} tensors) to {path}; {free / 1e9:.1f} GB free")
    if total > free:
        raise DataError(f"no space for {path}: the merged export is {total / 1e9:.2f} GB, {free / 1e9:.1f} GB free on "
                        f"{path.parent}; free space or skip --merge (predict does not need it)")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f, torch.no_grad():
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, dtype, make in tqdm(entries, desc="merging", unit="tensor", leave=False,
                                                 disable=len(entries) < 50):
                t = make().contiguous().cpu()
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise RuntimeError(f"merged tensor {name}: {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                del t
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return total
