"""Streaming checkpoint loading: a skeleton without weights, then one tensor at a time from the shards.

Why: building a 26-40B backbone with random init in fp32 and reading the whole checkpoint beside it needs
6-8 B/param of RAM and minutes of wasted init. Here:
- the Hugging Face parts are built without allocating or initialising weights (parameters on the meta
  device; buffers such as rotary tables stay real and tiny); under ZeRO-3 they are built partitioned by
  `deepspeed.zero.Init` instead, with init skipped;
- every checkpoint key is planned from the safetensors headers alone (names, shapes, dtypes), so a shape
  mismatch or a checkpoint that matches nothing is an error before a byte of weights is read, and parts
  the model does not build (LM head, text embeddings, layers past the deepest out_index, SAM2 head) are
  never read;
- tensors are read one at a time (one shard open at a time) and placed in their final dtype: frozen
  weights in the compute dtype, trainable ones in fp32; for NF4/int8 each `nn.Linear` is replaced by a
  bitsandbytes layer the moment its weight arrives and quantized on the training device (bitsandbytes
  quantizes on `.to(device)`), the source freed; never an fp32 copy of a quantized weight;
- under ZeRO-3 each tensor is copied into its partitioned parameter: gathered, written by rank 0,
  re-partitioned (every rank walks the same header-derived order, only rank 0 reads data).

What the run wants is given by a `LoadSpec` set around the model build (`loading_spec`); without one
(prediction, tests, tools) weights load in fp32 on the CPU, as a plain build would hold them.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from trainer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """How the run wants backbone weights placed."""

    frozen: bool = False  # the backbone's own weights will not train (LoRA/QLoRA, freeze_backbone)
    compute_dtype: torch.dtype = torch.float32
    quantization: str = "none"  # none | nf4 | int8: backbone nn.Linear layers, quantized on arrival
    quant_storage: torch.dtype = torch.uint8
    device: str = "cpu"  # where weights go (a GPU for runs without DeepSpeed; DeepSpeed moves them itself)
    zero3: bool = False  # parameters partitioned by ZeRO-3 as they are built (never with quantization)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.compute_dtype if self.frozen else torch.float32


_SPEC: contextvars.ContextVar[LoadSpec | None] = contextvars.ContextVar("terrascale_load_spec", default=None)


@contextlib.contextmanager
def loading_spec(spec: LoadSpec) -> Iterator[None]:
    token = _SPEC.set(spec)
    try:
        yield
    finally:
        _SPEC.reset(token)


def current_spec() -> LoadSpec:
    return _SPEC.get() or LoadSpec()


# --- the skeleton --------------------------------------------------------------------------------------
_SKELETON: contextvars.ContextVar[Callable[[], contextlib.AbstractContextManager] | None] = \
    contextvars.ContextVar("terrascale_skeleton", default=None)


def hf_build_context() -> contextlib.AbstractContextManager:
    """What `catalog.build_parts` wraps each Hugging Face part's construction in (a no-op outside a load)."""
    make = _SKELETON.get()
    return make() if make is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _empty_params() -> Iterator[None]:
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights
    from transformers.modeling_utils import set_zero3_state

    # Buffers stay real: rotary tables and the like are computed in __init__, small, and never in checkpoints.
    # set_zero3_state: transformers must not zero.Init (nor re-initialise) these parts on its own.
    with init_empty_weights(include_buffers=False), no_init_weights(), set_zero3_state():
        yield


@contextlib.contextmanager
def _zero3_params() -> Iterator[None]:
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import deepspeed_config
    from transformers.modeling_utils import set_zero3_state

    # transformers' own zero.Init would also gather every module to re-initialise it: weights arrive next.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
        yield


@contextlib.contextmanager
def skeleton(spec: LoadSpec) -> Iterator[None]:
    """Build the Hugging Face parts of a backbone without weights (or partitioned, under ZeRO-3)."""
    token = _SKELETON.set(_zero3_params if spec.zero3 else _empty_params)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


# --- reading -------------------------------------------------------------------------------------------
Mapper = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name → {dtype, shape} from a .safetensors header (8-byte length + JSON), without the data."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@dataclass
class _Target:
    key: str  # checkpoint key
    file: Path
    names: list[str]  # model names it maps to (several when a fused tensor is split)


@dataclass
class StreamStats:
    seconds: dict[str, float] = field(default_factory=lambda: dict(build=0.0, read=0.0, place=0.0, quantize=0.0))
    bytes_read: int = 0
    tensors: int = 0
    params: int = 0



def training_numerics(q: nn.Module) -> nn.Module:
    """Keep a Linear4bit on the kernel training uses. On an AVX512-bf16 CPU, bitsandbytes repacks a 4-bit weight in
    place at its first inference forward (eval + no grad: every validation), rounding its absmax to bf16 for good;
    training then goes on with another model, and merges and resumes differ. Prediction opts back in
    (`trainer.predict.inference`). Used wherever terrascale makes a Linear4bit (`fitting.quantize_linears` too)."""
    q.support_avx512bf16_for_cpu = False
    return q


class _Placer:
    """Puts one tensor into the model: dtype, device, quantization or ZeRO-3 partition."""

    def __init__(self, model: nn.Module, spec: LoadSpec, stats: StreamStats, quantize: Callable[[str], bool]):
        self.model, self.spec, self.stats, self.quantize = model, spec, stats, quantize
        self.rank0 = _rank() == 0

    def owner(self, name: str) -> tuple[nn.Module, str]:
        prefix, _, leaf = name.rpartition(".")
        return (self.model.get_submodule(prefix) if prefix else self.model), leaf

    def put(self, name: str, tensor: torch.Tensor | None) -> None:
        module, leaf = self.owner(name)
        old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
        if old is not None and is_partitioned(old):
            self._into_partition(old, tensor)
            return
        if tensor is None:  # not rank 0 of a ZeRO-3 load: nothing to place outside partitions
            return
        if leaf == "weight" and type(module) is nn.Linear and self.spec.quantization != "none" and self.quantize(name):
            self._quantized(name, module, tensor)
            return
        dtype = self.spec.weight_dtype if tensor.is_floating_point() else tensor.dtype
        t0 = time.perf_counter()
        new = tensor.to(device=self.spec.device, dtype=dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True)
        else:
            module._buffers[leaf] = new
        self.stats.seconds["place"] += time.perf_counter() - t0

    def _into_partition(self, param: torch.Tensor, tensor: torch.Tensor | None) -> None:
        import deepspeed

        t0 = time.perf_counter()
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if self.rank0:
                param.data.copy_(tensor.to(param.dtype))
        self.stats.seconds["place"] += time.perf_counter() - t0

    def _quantized(self, name: str, lin: nn.Linear, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        spec = self.spec
        t0 = time.perf_counter()
        has_bias = lin.bias is not None
        if spec.quantization == "nf4":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=spec.compute_dtype,
                                  compress_statistics=True, quant_type="nf4", quant_storage=spec.quant_storage,
                                  device="meta")
            training_numerics(q)
            # bitsandbytes quantizes from the tensor's own dtype: hand it the compute dtype, never fp32 on a GPU
            q.weight = bnb.nn.Params4bit(weight.to(spec.compute_dtype), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=spec.quant_storage, module=q)
        elif spec.quantization == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            raise ConfigError([f"memory.quantization: unknown kind {spec.quantization!r}; use none, nf4 or int8"])
        if has_bias:  # placed already (real) or still to come (meta, then placed like any frozen tensor)
            b = lin.bias.data
            q.bias = nn.Parameter(b.to(device=spec.device, dtype=spec.compute_dtype) if b.device.type != "meta" else b,
                                  requires_grad=False)
        q.weight = q.weight.to(spec.device)  # this quantizes (bitsandbytes' design); the source is dropped here
        parent, leaf = self.owner(name.rsplit(".", 1)[0])
        setattr(parent, leaf, q)
        self.stats.seconds["quantize"] += time.perf_counter() - t0


def _release_freed_heap() -> None:
    """glibc keeps freed quantization scratch in its heap; hand it back after each shard (cheap: ms). Without
    this the process held ~0.6 B/param more after an NF4 load (measured on a real-width 40B-class shard set)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc (e.g. musl): nothing to hand back this way
            pass


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _sort(mapped: dict[str, torch.Tensor], own: dict, skip: list[re.Pattern], report, mismatched: list[str]) -> list[str]:
    """The names in `mapped` the model holds at that shape; the rest goes to the report (skipped/unexpected)
    or to `mismatched`."""
    names = []
    for name, t in mapped.items():
        if name in own:
            if tuple(own[name]) != tuple(t.shape):
                mismatched.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(own[name])}")
            else:
                names.append(name)
        elif any(r.search(name) for r in skip):
            report.skipped.append(name)
        else:
            report.unexpected.append(name)
    return names


def _refuse(mismatched: list[str], matched: bool, first_keys: list[str], source: str) -> None:
    if mismatched:
        raise ConfigError([f"model.backbone_kwargs.pretrained_path: shape mismatch {m}" for m in mismatched[:10]],
                          source=source)
    if not matched:
        raise ConfigError(f"model.backbone_kwargs.pretrained_path: no tensor in {source} matches the model "
                          f"(first checkpoint keys: {first_keys}); check checkpoint_layout", source=source)


def plan_keys(files: list[Path], mapper: Mapper, own: dict[str, torch.Size], skip: list[re.Pattern],
              ignore_missing: Callable[[str], bool], source: str):
    """Map every checkpoint key from the headers alone; returns (targets, report pieces)."""
    from trainer.backbones.loading import LoadReport

    report = LoadReport(source)
    targets, mismatched, seen = [], [], set()
    for f in files:
        for key, info in safetensors_header(f).items():
            fake = torch.empty(info["shape"], dtype=_DTYPES.get(info["dtype"], torch.float32), device="meta")
            names = _sort(mapper({key: fake}), own, skip, report, mismatched)
            if names:
                targets.append(_Target(key, f, names))
                seen.update(names)
    _refuse(mismatched, bool(targets), [k for f in files[:1] for k in list(safetensors_header(f))[:5]], source)
    report.loaded = sorted(seen)
    report.missing = sorted(k for k in own if k not in seen and not ignore_missing(k))
    return targets, report


def stream_into(model: nn.Module, files: list[Path], mapper: Mapper, source: str, skip, ignore_missing,
                spec: LoadSpec, quantize: Callable[[str], bool] = lambda name: True, progress: bool = True):
    """Load `files` (safetensors) into `model` tensor by tensor; returns the LoadReport (with `.stats`)."""
    from safetensors import safe_open

    held = model.state_dict(keep_vars=True)  # persistent tensors only, as a checkpoint holds them
    own = {k: _full_shape(v) for k, v in held.items()}
    skip_re = [re.compile(p) for p in skip]
    targets, report = plan_keys(files, mapper, own, skip_re, ignore_missing, source)
    stats = StreamStats()
    placer = _Placer(model, spec, stats, quantize)
    bar = _progress(len(targets), source, progress and placer.rank0)
    by_file: dict[Path, list[_Target]] = {}
    for t in targets:
        by_file.setdefault(t.file, []).append(t)
    for f, items in by_file.items():
        # one shard mapped at a time: its pages are released when the handle closes
        with safe_open(str(f), framework="pt") as handle:
            for t in items:
                tensors: dict[str, torch.Tensor | None]
                # under ZeRO-3 only rank 0 reads what goes into partitions; anything else every rank needs
                if placer.rank0 or not all(is_partitioned(held[n]) for n in t.names):
                    t0 = time.perf_counter()
                    # get_tensor is a view of the mapped shard: a kept view (a norm weight, a bias) would keep the
                    # whole mapping resident after the shard is done. Copy out: the copy is the real read.
                    raw = handle.get_tensor(t.key).clone()
                    stats.seconds["read"] += time.perf_counter() - t0
                    stats.bytes_read += raw.numel() * raw.element_size()
                    tensors = {n: v for n, v in mapper({t.key: raw}).items() if n in t.names}
                    del raw
                else:
                    tensors = dict.fromkeys(t.names)
                for name in t.names:
                    value = tensors.pop(name)
                    if value is not None:
                        stats.params += value.numel()
                    placer.put(name, value)
                    del value
                stats.tensors += 1
                bar.update(1)
        _release_freed_heap()
    bar.close()
    materialize_missing(model, spec, report.missing)
    report.stats = stats
    return report


def _full_shape(t: torch.Tensor) -> torch.Size:
    return t.ds_shape if is_partitioned(t) else t.shape


def _progress(total: int, source: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"loading {Path(source).name}", unit="tensor", disable=not enabled or total < 50,
                leave=False)


def materialize_missing(model: nn.Module, spec: LoadSpec, missing: list[str] = ()) -> list[str]:
    """Parameters the checkpoint did not provide are still on meta (or, under ZeRO-3, partitions of
    uninitialised memory): give them memory and their module's own init."""
    done = []
    held = model.state_dict(keep_vars=True)
    owners: dict[str, nn.Module] = {}
    for name in missing:
        if name in held and is_partitioned(held[name]):
            owners.setdefault(name.rpartition(".")[0], model.get_submodule(name.rpartition(".")[0]))
    for mod_name, module in owners.items():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
            if _rank() == 0:
                _init_module(model, mod_name, module)
        done.append(mod_name)
    for mod_name, module in model.named_modules():
        metas = [n for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
        if not metas:
            continue
        for n in metas:
            p = module._parameters[n]
            module._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=spec.weight_dtype, device=spec.device),
                                                 requires_grad=p.requires_grad)
            done.append(f"{mod_name}.{n}" if mod_name else n)
        _init_module(model, mod_name, module)
    return done


def _init_module(model: nn.Module, mod_name: str, module: nn.Module) -> None:
    from transformers import PreTrainedModel

    owner = None  # the closest Hugging Face model above the module knows how to initialise it
    parts = mod_name.split(".") if mod_name else []
    for i in range(len(parts), -1, -1):
        candidate = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(candidate, PreTrainedModel):
            owner = candidate
            break
    with torch.no_grad():
        if owner is not None:
            owner._init_weights(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


def place_mapped(model: nn.Module, mapped: dict[str, torch.Tensor], source: str, skip, ignore_missing,
                 spec: LoadSpec, unexpected=(), quantize: Callable[[str], bool] = lambda name: True):
    """The same placement for tensors already in memory (pickle files, or a transformers conversion)."""
    from trainer.backbones.loading import LoadReport

    held = model.state_dict(keep_vars=True)
    own = {k: _full_shape(v) for k, v in held.items()}
    skip_re = [re.compile(p) for p in skip]
    report = LoadReport(source, unexpected=list(unexpected))
    mismatched: list[str] = []
    to_load = _sort(mapped, own, skip_re, report, mismatched)
    _refuse(mismatched, bool(to_load), list(mapped)[:5], source)
    stats = StreamStats()
    placer = _Placer(model, spec, stats, quantize)
    for name in to_load:
        value = mapped.pop(name)
        stats.params += value.numel()
        stats.tensors += 1
        placer.put(name, value)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in set(to_load) and not ignore_missing(k))
    materialize_missing(model, spec, report.missing)
    report.stats = stats
    return report
