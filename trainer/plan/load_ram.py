"""CPU RAM while the run loads the model, per profile (modeled on the streaming loader; docs/planner.md).

The loader (trainer.backbones.loading) builds a catalog backbone's skeleton on the meta device and reads the
checkpoint one tensor at a time, one safetensors shard open at a time, placing each tensor in its final dtype
and place. What stays in CPU RAM at the load peak therefore depends on where the profile puts the weights:

- quantized (qlora, int8), no DeepSpeed: each linear is quantized on the training device as it arrives; the CPU
  holds one shard's mapped pages and the tensor being read (plus its cast when the dtypes differ);
- no DeepSpeed, not quantized (full, lora): the model is assembled in its final dtypes (frozen weights in the
  compute dtype, trainable ones fp32) on the CPU before Accelerate moves it;
- ZeRO-2: the 16-bit model on the CPU before DeepSpeed partitions it;
- ZeRO-3 (built under zero.Init): partitions on the GPU, or on the CPU with parameter offload (16-bit), the fp32
  master and Adam moments on the CPU for what trains when the optimizer is offloaded, one module gathered at a
  time to be filled.

Sizes come from the checkpoint itself when the experiment names one on this machine (safetensors headers: an
8-byte little-endian length, then JSON with each tensor's dtype, shape and byte range), else from the catalog.
TerraTorch-built backbones keep TerraTorch's own loading: the fp32 model built on the CPU and its checkpoint
read whole beside it.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from trainer.memory import states as st

# Peak RSS of a Python process that imported what `trainer.train.run` imports (torch, transformers, DeepSpeed,
# Accelerate, peft, bitsandbytes, TerraTorch) before any model exists: 1 335 724 kB, measured on this machine with
# `/usr/bin/time -v python -c "import ..., trainer.train.run"`; a CUDA host adds the CUDA runtime's host memory (not
# measured: no GPU here).
PROCESS_BASELINE = 1_335_724 * 1024
# Checkpoints not on this machine: OpenGVLab, Qwen, Google and IBM published these backbones as bf16 safetensors
# (config.json `torch_dtype`), sharded by transformers 4.x's `save_pretrained(max_shard_size="5GB")` default.
PUBLISHED_DTYPE_BYTES = {"internvl": 2, "qwen2_vl": 2, "gemma3": 2, "granite_hybrid": 2}
PUBLISHED_SHARD_BYTES = 5 * 10**9

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                           "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class Checkpoint:
    source: str          # where the numbers come from (shown in the plan)
    shard_bytes: int     # the largest shard: its pages are mapped while it is open
    dtype_bytes: int     # bytes per element of the checkpoint's floating-point weights
    total_bytes: int     # all shards (what TerraTorch-style whole reads hold)


def read_header(path: Path) -> dict:
    """A safetensors file's header: {tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def from_safetensors(root: Path) -> Checkpoint | None:
    """The checkpoint's numbers from its shards' headers and sizes; None without safetensors files."""
    shards = [root] if root.is_file() else sorted(root.glob("*.safetensors"))
    shards = [s for s in shards if s.suffix == ".safetensors"]
    if not shards:
        return None
    by_dtype: dict[str, int] = {}
    for shard in shards:
        for name, t in read_header(shard).items():
            if name != "__metadata__" and t["dtype"].startswith(("F", "BF")):
                start, end = t["data_offsets"]
                by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + end - start
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    sizes = [s.stat().st_size for s in shards]
    return Checkpoint(f"safetensors headers of {len(shards)} shard(s) in {root}", max(sizes),
                      SAFETENSORS_DTYPE_BYTES[dtype], sum(sizes))


def from_catalog(family: str, published_params: float) -> Checkpoint:
    per = PUBLISHED_DTYPE_BYTES.get(family, 4)
    total = int(per * published_params)
    return Checkpoint(f"catalog: {published_params / 1e9:.2f}B published parameters at {per} B, shards of at most "
                      f"{PUBLISHED_SHARD_BYTES / 1e9:.0f} GB", min(total, PUBLISHED_SHARD_BYTES), per, total)


@dataclass(frozen=True)
class LoadCase:
    """What the profile does with the weights as they arrive."""

    quantized: bool
    zero: st.ZeroSettings | None
    compute_bytes: int   # the compute dtype (frozen weights without DeepSpeed; every weight under DeepSpeed)


def streamed_peak(c: st.Counts, ck: Checkpoint | None, case: LoadCase) -> dict[str, int]:
    """CPU RAM at the load peak of a catalog backbone read by the streaming loader, by part.

    `ck` None: nothing is read (random initialisation); the skeleton is still filled in place."""
    p, frozen = case.compute_bytes, c.all - c.trainable
    # the tensor being read, in the checkpoint's dtype, and its cast when the final dtype differs
    read = ck.dtype_bytes if ck else 0
    tensor = c.largest_layer * (read + (p if ck and p != read else 0))
    parts = dict(baseline=PROCESS_BASELINE, shard=ck.shard_bytes if ck else 0, tensor=tensor, model=0)
    z = case.zero
    if z is None:
        if case.quantized:  # quantized on the device on arrival; the decoder is built on the CPU (fp32)
            parts["model"] = 4 * c.head
        else:
            parts["model"] = p * frozen + 4 * c.trainable
    elif z.stage < 3:
        parts["model"] = p * c.all
    else:
        parts["model"] = (p * c.all if z.offload_param == "cpu" else 0) + \
            (12 * c.trainable if z.offload_optimizer == "cpu" else 0)
        parts["tensor"] += p * c.largest_layer  # the module being filled, gathered
    parts["total"] = sum(parts.values())
    return parts


def whole_peak(c: st.Counts, ck: Checkpoint | None) -> dict[str, int]:
    """TerraTorch-built backbones: the model built in fp32 on the CPU and the checkpoint read whole beside it."""
    parts = dict(baseline=PROCESS_BASELINE, shard=ck.total_bytes if ck else 0, tensor=0, model=4 * c.all)
    parts["total"] = sum(parts.values())
    return parts
