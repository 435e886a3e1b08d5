"""What the planner measures about an experiment's backbone: parameter counts and one traced training step.

Catalog backbones built by terrascale's own classes (InternVL, Qwen2-VL, Gemma 3, EarthMind, Granite, SatMAE)
are measured here without TerraTorch or Accelerate:
- counts from the real-size model built on the meta device (exact: the same class and kwargs the run builds);
- activations, temporaries and FLOPs from a step traced on fake tensors at the configured batch, tile, dtype
  policy, checkpointing and LoRA, at full width but 2 and 4 layers of each layer stack, extrapolated linearly
  in depth (identical layers add identical memory; the validation test checks the extrapolation).
Every trace is cached (`plan_cache`). Backbones built by TerraTorch itself are measured whole in `head.py`.

Import direction: `memory` builds the backbones' own modules (`trainer.backbones`, none of which imports
TerraTorch at module level) and reuses `trainer.model.fitting`'s checkpointing switch and LoRA target rule, so the
traced model is the one the run trains; it never imports TerraTorch, `trainer.model.models` or Accelerate.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from trainer.backbones import catalog
from trainer.config import Experiment
from trainer.errors import ConfigError, PlanError
from trainer.memory.profiles import Profile, compute_dtype
from trainer.plan import plan_cache

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OWN_FAMILIES = (*catalog.VLM_FAMILIES, "granite_hybrid", "satmae")
# Build-time kwargs of `factory.build_backbone` that do not reach the backbone class.
_LOAD_KWARGS = ("tiny", "size", "pretrained", "pretrained_path", "checkpoint_layout", "trust_remote_code",
                "allow_pickle")
SMALL_PARAM = 1_000_000  # params up to this size are kept by size, for any ZeRO-3 persistence threshold


@dataclass(frozen=True)
class InputShape:
    batch: int
    channels: int
    height: int
    width: int
    dates: int = 1  # change detection: T co-registered dates a sample, the model takes [B, T, C, H, W]
    # a multimodal batch ({modality: [B, C_m, H, W]}, TerraMind through a TerraTorch datamodule): (name, C_m) in
    # batch order, `channels` their sum; empty for one image tensor
    modalities: tuple[tuple[str, int], ...] = ()

    def key(self) -> dict:
        """For cache keys; a single-date shape keys as it did before `dates` existed (the shipped seed holds)."""
        d = dataclasses.asdict(self)
        if self.dates == 1:
            del d["dates"]
        if not self.modalities:
            del d["modalities"]
        else:
            d["modalities"] = [list(m) for m in self.modalities]
        return d

    def per_date(self) -> "InputShape":
        """What a shared encoder sees (trainer.model.temporal.SharedEncoder): every date of every sample as an image."""
        return InputShape(self.batch * self.dates, self.channels, self.height, self.width)

    def tensor(self) -> tuple[int, ...]:
        """The batch the loader hands the model."""
        return ((self.batch, self.dates) if self.dates > 1 else (self.batch,)) + (self.channels, self.height,
                                                                                   self.width)

    def example(self, dtype: torch.dtype):
        """A random batch of this shape (under a FakeTensorMode: a fake one), as the model takes it: one tensor,
        or {modality: tensor} for a multimodal batch."""
        if self.modalities:
            return {name: torch.randn(self.batch, c, self.height, self.width, dtype=dtype)
                    for name, c in self.modalities}
        return torch.randn(*self.tensor(), dtype=dtype)


def input_shape(exp: Experiment, tile_size: int | None = None) -> InputShape:
    """The batch the loader hands the model: data.batch_size tiles of the configured bands and size."""
    d, kw = exp.data, exp.model.backbone_kwargs
    bands = kw.get("bands")
    if isinstance(bands, dict):  # TerraMind: {modality: [band, ...]}; one modality is one input tensor
        bands = [b for per_modality in bands.values() for b in per_modality]
    channels = (len(d.bands) if d.bands else kw.get("in_channels") or (len(bands) if bands else None)
                or (d.synthetic.num_bands if d.kind == "synthetic" else None))
    size = tile_size or (d.synthetic.tile_size if d.kind == "synthetic" else None) or kw.get("img_size")
    if d.kind == "terratorch" and size is None:
        size = (d.terratorch.init_args.get("img_size") if d.terratorch else None)
    problems = []
    if channels is None:
        problems.append("the number of input bands is unknown: set data.bands or model.backbone_kwargs.in_channels")
    if size is None:
        problems.append("the tile size is unknown for this data.kind: pass --tile-size")
    if problems:
        raise PlanError("\n".join(problems))
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return InputShape(d.batch_size, int(channels), int(h), int(w), exp.task.dates)


@dataclass(frozen=True)
class TraceMode:
    """How one profile runs a step, as far as activations care."""

    precision: str            # fp32 | bf16 | fp16: the matmul dtype
    autocast: bool            # True: fp32 weights under autocast (Accelerate); False: model cast (DeepSpeed)
    grad_checkpointing: bool
    train_backbone: bool      # False: frozen (LoRA, or model.freeze_backbone)
    lora: tuple | None = None  # (rank, alpha, dropout, targets)
    four_bit: bool = False
    # Frozen parameters held in the compute dtype, trainable ones fp32 (trainer.model.fitting.cast_frozen: no DeepSpeed,
    # a 16-bit run). Keyed only when set, so traces without frozen parameters keep their cache keys.
    frozen_cast: bool = False
    # Prediction: forward only under no_grad, the whole model in the compute dtype, eval mode. Keyed only when
    # set (training traces keep their cache keys).
    inference: bool = False

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        for flag in ("frozen_cast", "inference"):
            if not d[flag]:
                del d[flag]
        return d


def inference_mode(precision: str) -> TraceMode:
    """How prediction runs (trainer.plan.inference): every weight in the compute dtype (`precision` here is the
    compute dtype: NF4/int8 weights are dequantized to it per matmul, which leaves activations those of a model
    held in it), no autocast, no checkpointing (nothing is saved for backward)."""
    return TraceMode(precision=precision, autocast=False, grad_checkpointing=False, train_backbone=False,
                     inference=True)


def uses_deepspeed_cast(profile: Profile) -> bool:
    # under DeepSpeed the run holds the model in the compute dtype (trainer.train.job.deepspeed_bf16); without it
    # Accelerate keeps fp32 weights and autocasts.
    return profile.deepspeed is not None


def trace_mode(profile: Profile, precision: str, exp: Experiment, targets: list[str] | None) -> TraceMode:
    lora = None
    if profile.lora is not None:
        lora = (profile.lora.rank, profile.lora.alpha, profile.lora.dropout, tuple(targets or ()))
    autocast = not uses_deepspeed_cast(profile) and precision != "fp32"
    train_backbone = profile.lora is None and not exp.model.freeze_backbone
    return TraceMode(precision=precision, autocast=autocast, grad_checkpointing=profile.grad_checkpointing,
                     train_backbone=train_backbone, lora=lora, four_bit=profile.quantization == "nf4",
                     frozen_cast=autocast and not train_backbone)


# --- the backbone as the run builds it ---------------------------------------------------------------
@dataclass
class OwnBackbone:
    """A catalog backbone built by terrascale's own class: how to build it at any depth."""

    entry: catalog.Entry
    kwargs: dict[str, Any]                      # constructor kwargs from model.backbone_kwargs
    spec: dict[str, Any]                        # what identifies it in the cache
    make_config: Callable[[], Any] | None = None
    config_value: Any = None                    # transformers config, or the dims dict (SatMAE)

    @property
    def family(self) -> str:
        return self.entry.family

    @property
    def config(self) -> Any:
        # Built on first use only: a cached plan never needs it, and building an InternVL config makes
        # transformers import Accelerate (AutoConfig.for_model → transformers.integrations), ~2 s.
        if self.config_value is None:
            self.config_value = self.make_config()
        return self.config_value


def own_backbone(exp: Experiment) -> OwnBackbone | None:
    """The experiment's backbone if a terrascale class builds it (no TerraTorch needed), else None."""
    if exp.terratorch is not None:  # a `terratorch fit` file: its model is whatever TerraTorch's CLI builds
        return None
    name = exp.model.backbone
    try:
        entry = catalog.get(name)
    except ConfigError:  # not in the catalog: TerraTorch builds it (head.whole_step)
        return None
    if entry.family not in OWN_FAMILIES:
        return None
    from trainer.backbones import factory, loading  # light: no TerraTorch at module level

    kw = dict(exp.model.backbone_kwargs)
    tiny = kw.get("tiny", False) or kw.get("size") == "tiny"
    source = exp.model.pretrained_path or kw.get("pretrained_path") or (entry.hub_id if kw.get("pretrained") else None)
    root = loading.resolve_path(source) if source else None
    ctor = {k: v for k, v in kw.items() if k not in _LOAD_KWARGS}
    factory.check_kwargs(factory.family_class(entry.family), ctor)
    # the config is the checkpoint's config.json when there is one, else the catalog's (tiny) dimensions
    spec = {"backbone": name, "dims": catalog.thaw(entry.dims), "tiny": bool(tiny), "kwargs": ctor,
            "checkpoint_config": loading.read_config_json(root) if root is not None else None}
    return OwnBackbone(entry, ctor, spec, lambda: factory.backbone_config_for(entry, root, tiny, kw.get("trust_remote_code", False)))


def _kinds(config) -> list[str]:
    return list(dict.fromkeys(config.layer_types[: config.num_hidden_layers]))


def _at_depth(b: OwnBackbone, depths: dict[str, int] | None):
    """(config, kwargs) for a build with `depths` layers per stack (None: the real depth)."""
    cfg = copy.deepcopy(b.config)  # finalize() writes the kept depth into the config it was built from
    if depths is None:
        return cfg, dict(b.kwargs)
    kwargs = {k: v for k, v in b.kwargs.items() if k != "out_indices"}  # default indices fit any depth
    fam = b.family
    if fam == "satmae":
        cfg["depth"] = depths["layers"]
    elif fam == "granite_hybrid":
        cfg.layer_types = [kind for kind in _kinds(b.config) for _ in range(depths[kind])]
        cfg.num_hidden_layers = len(cfg.layer_types)
    else:
        vision = cfg.vision_config
        setattr(vision, "depth" if fam == "qwen2_vl" else "num_hidden_layers", depths["vision"])
        if "text" in depths:
            _set_layers(cfg.text_config, depths["text"])
    return cfg, kwargs


def _set_layers(config, n: int) -> None:
    # Per-layer lists (sliding/full attention) are sized at construction: cycle the real pattern to `n`.
    config.num_hidden_layers = n
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = [types[i % len(types)] for i in range(n)]


def build(b: OwnBackbone, depths: dict[str, int] | None = None) -> nn.Module:
    """On the meta device (initialisers never run; convert with `trace.meta_to_fake_`)."""
    from trainer.backbones.factory import family_class

    cfg, kwargs = _at_depth(b, depths)
    with torch.device("meta"):
        model = family_class(b.family)(cfg, **kwargs)
        model.finalize()
    return model


def stacks(b: OwnBackbone, model: nn.Module) -> dict[str, int]:
    """Layers per stack in the real model (after `finalize` dropped layers no feature reads)."""
    fam = b.family
    if fam == "satmae":
        return {"layers": len(model.vit.blocks)}
    if fam == "granite_hybrid":
        run = model.config.layer_types[: len(model.language_model.layers)]
        return {k: run.count(k) for k in dict.fromkeys(run)}
    if getattr(model, "mode", "vision") == catalog.FULL:
        vision = len(model.visual.blocks) if fam == "qwen2_vl" else len(model.vision_layers())
        return {"vision": vision, "text": len(model.language_model.layers)}
    return {"vision": len(model.vision_layers())}


# --- parameter counts ----------------------------------------------------------------------------------
def count_params(model: nn.Module, lora_targets: list[str] | None, rank: int | None) -> dict[str, Any]:
    """Counts the arithmetic needs, from a model on the meta or fake device (no storage is touched)."""
    from trainer.plan.trace import matches_target

    params = list(model.parameters())  # de-duplicates tied parameters
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    numels: dict[int, int] = {}
    for _, lin in linears:
        numels[lin.weight.numel()] = numels.get(lin.weight.numel(), 0) + 1
    small: dict[int, int] = {}
    for p in params:
        if p.numel() <= SMALL_PARAM:
            small[p.numel()] = small.get(p.numel(), 0) + 1
    lora = 0
    if lora_targets and rank:
        lora = sum(rank * (m.in_features + m.out_features) for n, m in linears if matches_target(n, lora_targets))
    return dict(
        total=sum(p.numel() for p in params),
        linear_weights=sum(k * v for k, v in numels.items()),
        linear_numels={str(k): v for k, v in sorted(numels.items())},
        linear_biases=sum(m.bias.numel() for _, m in linears if m.bias is not None),
        largest_linear=max(numels, default=0),
        # DeepSpeed's own definition (stage3.model_to_params): a module's directly owned parameters
        largest_layer=max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0),
        small_params={str(k): v for k, v in sorted(small.items())},
        lora=lora,
    )


# --- traced steps --------------------------------------------------------------------------------------
def prepare_for_trace(model: nn.Module, mode: TraceMode, backbone: nn.Module | None = None) -> nn.Module:
    """Dtypes, trainability, LoRA and checkpointing as the profile sets them (fitting's order)."""
    from trainer.model.fitting import enable_grad_checkpointing
    from trainer.plan.trace import add_trace_lora_, set_dtype_

    backbone = model if backbone is None else backbone
    dtype = compute_dtype(mode.precision)
    if mode.inference:
        for p in model.parameters():
            p.requires_grad_(False)
        return set_dtype_(model, dtype).eval()
    if not mode.autocast:
        set_dtype_(model, dtype)
    elif mode.four_bit:
        # NF4 weights are dequantized to the compute dtype for each matmul: a frozen compute-dtype weight has
        # the same activations; the 4-bit storage and the dequantization buffer are counted by `states.py`.
        set_dtype_(backbone, dtype, only=lambda m, name: type(m) is nn.Linear and name == "weight")
    if not mode.train_backbone:
        for p in backbone.parameters():
            p.requires_grad_(False)
    if mode.lora is not None:
        rank, alpha, dropout, targets = mode.lora
        add_trace_lora_(backbone, list(targets), rank, alpha, dropout, four_bit=mode.four_bit)
    if mode.grad_checkpointing:
        enable_grad_checkpointing(backbone)
    if mode.frozen_cast:  # after LoRA, as trainer.model.fitting.apply_profile: adapters and head stay fp32
        set_dtype_(model, dtype, only=lambda m, name: name in m._parameters and not m._parameters[name].requires_grad)
    return model.train()


def input_dtype(mode: TraceMode) -> torch.dtype:
    # trainer.train.run feeds bf16 batches only when DeepSpeed runs in bf16 (Job.input_dtype)
    return torch.float32 if mode.autocast else compute_dtype(mode.precision)


def _trace_own(b: OwnBackbone, depths: dict[str, int], mode: TraceMode, shape: InputShape) -> dict[str, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.plan.trace import meta_to_fake_, trace_forward, trace_step

    model = build(b, depths)
    fake = FakeTensorMode()
    with fake:
        prepare_for_trace(meta_to_fake_(model), mode)
    x_dtype = input_dtype(mode)
    if mode.inference:
        t = trace_forward(model, lambda: (torch.randn(*shape.tensor(), dtype=x_dtype),), fake_mode=fake)
        return dict(peak=t["peak"], flops=t["flops"], outputs=[[list(s), d] for s, d in t["outputs"]])
    amp = compute_dtype(mode.precision) if mode.autocast else None
    t = trace_step(model, lambda: (torch.randn(*shape.tensor(), dtype=x_dtype),), autocast=amp, fake_mode=fake)
    return dict(peak=t.peak, peak_with_grads=t.peak_with_grads, after_forward=t.after_forward, flops=t.flops,
                outputs=[[list(shape), dtype] for shape, dtype in t.outputs])


def _lerp(base: dict, points: dict[str, tuple[dict, int, int, int]]) -> dict:
    """base + Σ_stack (full − b) · (trace(e) − trace(b)) / (e − b), for every number in the trace."""
    def numbers(d: dict, path=()) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = numbers(v, path + (k,))
            elif isinstance(v, (int, float)):
                total = v
                for trace, b, e, full in points.values():
                    node = trace
                    for p in path + (k,):
                        node = node[p]
                    total += (full - b) * (node - v) / (e - b)
                out[k] = int(round(total))
            else:
                out[k] = v
        return out
    return numbers(base)


def backbone_step(b: OwnBackbone, full: dict[str, int], mode: TraceMode, shape: InputShape) -> dict[str, Any]:
    """The traced step of the whole backbone: reduced-depth traces, cached, extrapolated to `full` depth."""
    lo = {s: min(n, 2) for s, n in full.items()}
    hi = {s: min(n, 4) for s, n in full.items()}
    spec = {"kind": "backbone", **b.spec, "mode": mode.key(), "input": shape.key(),
            "torch": torch.__version__, "transformers": package_version("transformers")}

    fresh = []

    def traced(depths: dict[str, int]) -> dict:
        value, hit = plan_cache.cached({**spec, "depths": depths}, lambda: _trace_own(b, depths, mode, shape))
        if not hit:
            fresh.append(depths)
        return value

    base = traced(lo)
    points = {s: (traced({**lo, s: hi[s]}), lo[s], hi[s], full[s]) for s in full if hi[s] > lo[s]}
    out = _lerp(base, points)
    out["outputs"] = base["outputs"]
    out["traced_depths"] = {s: sorted({lo[s], hi[s]}) for s in full}
    out["full_depths"] = dict(full)
    out["traced_now"] = len(fresh)
    return out


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"
