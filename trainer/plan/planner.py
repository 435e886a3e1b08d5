"""Will it fit? GPU peak, CPU and NVMe needs and step-time bounds of every profile, and the `auto` choice.

`plan_experiment` measures the experiment once (counts, traced steps: `workload.py`, `head.py`) and applies each
profile's arithmetic (`states.py`). `choose_profile` picks the fastest profile that fits with `AUTO_MARGIN` to
spare. Sources of each number, and what no GPU has confirmed yet: docs/planner.md.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from trainer.config import Experiment
from trainer.errors import ConfigError, PlanError
from trainer.memory import states as st
from trainer.memory import deepspeed as ds
from trainer.memory.profiles import Profile, check_deepspeed, no_backbone_refusal, precision_for, profile_for
from trainer.plan import head as head_mod
from trainer.plan import load_ram as lr
from trainer.plan import workload as wl
from trainer.plan.assumptions import (AUTO_MARGIN, CUDA_CONTEXT_BYTES, FRAGMENTATION,  # noqa: F401  (public here)
                                      GPU_FLOPS, NVME_READ_PER_S, NVME_WRITE_PER_S, PCIE_BYTES_PER_S, PLAN_WORLD_SIZE,
                                      SPEED_ORDER, pick)
from trainer.plan.measure import Measurer
from trainer.units import parse_size  # noqa: F401  (the planner's public API)

GiB = 1 << 30

@dataclass(frozen=True)
class Budget:
    gpu: int
    cpu: int
    nvme_path: str | None = None
    device: str = "cuda"  # "cpu": predict a CPU run (validation): fp32, no CUDA context

    @property
    def nvme_free(self) -> int | None:
        return shutil.disk_usage(self.nvme_path).free if self.nvme_path else None


@dataclass
class Estimate:
    profile: str
    precision: str
    # gpu: params, grads, optimizer, activations, temporaries, allowance, total; cpu: load_peak, training, total
    gpu: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    load: dict[str, int] = field(default_factory=dict)  # the load peak by part (trainer.plan.load_ram)
    nvme: int = 0
    fits: bool = False
    fits_with_margin: bool = False
    why_not: list[str] = field(default_factory=list)
    compute_s: float | None = None
    transfer_s: float | None = None
    nvme_s: float | None = None
    refused: str | None = None
    traced: bool = True  # False: the model states alone exceed the GPU budget; gpu["total"] is a lower bound

    @property
    def step_bound_s(self) -> float | None:
        times = [t for t in (self.compute_s, self.transfer_s, self.nvme_s) if t is not None]
        return max(times) if times else None


@dataclass
class Plan:
    backbone: str
    mode: str
    shape: wl.InputShape
    budget: Budget
    counts: dict[str, int]
    estimates: dict[str, Estimate]
    method: dict[str, str]
    seconds: float = 0.0
    measured_now: list[str] = field(default_factory=list)

    def table(self) -> str:
        from trainer.plan.plan_report import text_table

        return text_table(self)

    def to_json(self) -> dict[str, Any]:
        from trainer.plan.plan_report import to_json

        return to_json(self)


def _zero(exp: Experiment, profile: Profile, precision: str) -> tuple[st.ZeroSettings | None, str | None]:
    """(ZeRO settings, refusal) from the profile's DeepSpeed JSON rendered as the run renders it
    (`trainer.memory.deepspeed.config_for`, for one process) and the run's combination check
    (`trainer.memory.profiles.check_deepspeed`)."""
    # total steps only fill a JSON scheduler's "auto"; the NVMe path a placeholder when unset (nothing is swapped)
    cfg = ds.config_for(exp, profile, precision, PLAN_WORLD_SIZE, exp.run.max_steps or 1000,
                        nvme_path=exp.memory.nvme_path or "/nvme")
    zero = st.zero_settings(cfg) if cfg is not None else None
    try:
        check_deepspeed(exp, profile, cfg)
    except ConfigError as e:
        return zero, "; ".join(e.issues)
    return zero, None


def _counts(c: dict, profile: Profile, zero: st.ZeroSettings | None, exp: Experiment) -> st.Counts:
    lora = c["lora"] if profile.lora else 0
    threshold = zero.persistence_threshold if zero else 0
    persistent = sum(int(n) * k for n, k in c["small_params"].items() if int(n) <= threshold)
    backbone_trains = profile.lora is None and not exp.model.freeze_backbone
    trainable = (c["total"] if backbone_trains else 0) + c["head"] + lora
    return st.Counts(backbone=c["total"], head=c["head"], lora=lora, linear_weights=c["linear_weights"],
                     linear_numels=c["linear_numels"], linear_biases=c["linear_biases"],
                     largest_linear=c["largest_linear"], largest_layer=max(c["largest_layer"], c["head_largest"]),
                     persistent=persistent, trainable=trainable)


def checkpoint_of(exp: Experiment, m: Measurer) -> lr.Checkpoint | None:
    """The checkpoint the run reads: its safetensors headers when the experiment names one present here, else the
    catalog's numbers; None when nothing is read. TerraTorch-built backbones: None (`_load_peak` models them)."""
    return m.once_per_plan("checkpoint", lambda: _checkpoint(exp, m))


def _checkpoint(exp: Experiment, m: Measurer) -> lr.Checkpoint | None:
    if not m.loads or m.own is None:
        return None
    kw = exp.model.backbone_kwargs
    source = exp.model.pretrained_path or kw.get("pretrained_path") or (m.own.entry.hub_id if kw.get("pretrained")
                                                                       else None)
    if source:
        from trainer.backbones.loading import resolve_path

        try:
            found = lr.from_safetensors(resolve_path(source))
        except ConfigError:  # not on this machine (planning elsewhere): the catalog's numbers
            found = None
        if found is not None:
            return found
    return lr.from_catalog(m.own.family, m.own.entry.published_params)


def _load_peak(c: st.Counts, m: Measurer, ck: lr.Checkpoint | None, profile: Profile, zero: st.ZeroSettings | None,
               p: int) -> dict[str, int]:
    """CPU RAM at the load peak, by part (trainer.plan.load_ram)."""
    if m.own is None:  # TerraTorch's own loading: the fp32 model, and an fp32 checkpoint read whole beside it
        return lr.whole_peak(c, lr.Checkpoint("fp32 state dict", 0, 4, 4 * c.backbone) if m.loads else None)
    return lr.streamed_peak(c, ck, lr.LoadCase(profile.quantization != "none", zero, p))


def optimizer_kind(exp: Experiment) -> str:
    # memory.optimizer (adamw | adamw_8bit | paged_adamw_8bit; 8-bit needs optim.name adamw and no DeepSpeed,
    # trainer.config); optim.name: sgd keeps one momentum buffer
    return "sgd" if exp.optim.name == "sgd" else exp.memory.optimizer


def _states(c: st.Counts, profile: Profile, zero: st.ZeroSettings | None, p: int, exp: Experiment) -> st.States:
    if zero is None:
        return st.accelerate_states(c, p, nf4=profile.quantization == "nf4",
                                    optimizer_bytes=st.optimizer_state_bytes(optimizer_kind(exp), c.trainable))
    return st.zero_states(c, p, zero, exp.run.grad_accum)


def estimate(exp: Experiment, profile: Profile, budget: Budget, m: Measurer, exhaustive: bool = False) -> Estimate:
    precision = precision_for(exp, profile, on_gpu=budget.device == "cuda")
    est = Estimate(profile.name, precision)
    zero, refusal = _zero(exp, profile, precision)
    if refusal is None:
        refusal = no_backbone_refusal(profile, m.model_name)  # the run's own refusal (trainer.train.terratorch_run)
    if refusal:
        est.refused = f"refused: {refusal}"
        est.why_not.append(est.refused)
        return est
    p = wl.BYTES[precision]
    context = CUDA_CONTEXT_BYTES if budget.device == "cuda" else 0
    if m.own is not None and not exhaustive:
        # Model states of the backbone alone are a lower bound; past the budget no activation can save it.
        c0 = _counts({**m.own_counts(profile), "head": 0, "head_largest": 0}, profile, zero, exp)
        bound = _states(c0, profile, zero, p, exp)
        low = bound.gpu_params + bound.gpu_grads + bound.gpu_optimizer + context
        if low > budget.gpu:
            est.traced = False
            est.gpu = dict(params=bound.gpu_params, grads=bound.gpu_grads, optimizer=bound.gpu_optimizer,
                           activations=0, temporaries=0, allowance=context, total=low)
            est.load = _load_peak(c0, m, checkpoint_of(exp, m), profile, zero, p)
            est.cpu = dict(load_peak=est.load["total"], training=bound.cpu, total=max(est.load["total"], bound.cpu))
            est.why_not.append(f"GPU > {low / GiB:.1f} GiB from model states alone (activations not traced)")
            return est
    try:
        raw, dyn = m.step(profile, precision)
    except RuntimeError as e:  # an op the model cannot run this way (shown in the row, not hidden)
        est.refused = f"cannot run this profile's step: {str(e).splitlines()[0][:160]}"
        est.why_not.append(est.refused)
        return est
    except ConfigError as e:  # the run's own refusal of this profile on this model (trainer.model.fitting)
        est.refused = f"refused: {'; '.join(e.issues)}"
        est.why_not.append(est.refused)
        return est
    c = _counts(raw, profile, zero, exp)
    s = _states(c, profile, zero, p, exp)
    micro = exp.run.grad_accum
    if zero is None:
        step = dyn["peak"]
        temps = step["temporaries"] + (st.dequant_buffer(c.largest_linear, p) if profile.quantization == "nf4" else 0)
        if step["grads"] + step["activations"] + temps >= s.gpu_grads:
            grads, acts = step["grads"], step["activations"]
        else:  # the optimizer step, with every gradient alive, is the higher moment
            grads, acts, temps = s.gpu_grads, 0, 0
    else:
        grads, acts = s.gpu_grads, dyn["peak"]["activations"]
        temps = dyn["peak"]["temporaries"] + s.gpu_buffers  # DeepSpeed frees param.grad into its buckets
    gpu = dict(params=s.gpu_params + dyn["buffers"], grads=grads, optimizer=s.gpu_optimizer, activations=acts,
               temporaries=temps)
    tensors = sum(gpu.values())
    gpu["allowance"] = int(context + FRAGMENTATION * tensors) if budget.device == "cuda" else 0
    gpu["total"] = tensors + gpu["allowance"]
    est.load = _load_peak(c, m, checkpoint_of(exp, m), profile, zero, p)
    est.gpu, est.nvme = gpu, s.nvme
    est.cpu = dict(load_peak=est.load["total"], training=s.cpu, total=max(est.load["total"], s.cpu))
    est.compute_s = micro * dyn["flops"] / GPU_FLOPS
    if s.h2d_bytes or s.d2h_bytes:
        est.transfer_s = max(s.h2d_bytes, s.d2h_bytes) / PCIE_BYTES_PER_S
    if s.nvme_read:
        est.nvme_s = max(s.nvme_read / NVME_READ_PER_S, s.nvme_write / NVME_WRITE_PER_S)
    _judge(est, budget)
    return est


def _judge(est: Estimate, budget: Budget) -> None:
    g, c = est.gpu["total"], est.cpu["total"]
    if g > budget.gpu:
        est.why_not.append(f"GPU {g / GiB:.1f} GiB > {budget.gpu / GiB:.1f} GiB")
    if c > budget.cpu:
        what = "loading the model" if est.cpu["load_peak"] >= est.cpu["training"] else "offloaded states"
        est.why_not.append(f"CPU {c / GiB:.1f} GiB ({what}) > {budget.cpu / GiB:.1f} GiB")
    if est.nvme:
        if not budget.nvme_path:
            est.why_not.append(f"needs {est.nvme / GiB:.0f} GiB on an NVMe path: pass --nvme PATH")
        elif est.nvme > (budget.nvme_free or 0):
            est.why_not.append(f"NVMe {est.nvme / GiB:.0f} GiB > {budget.nvme_free / GiB:.0f} GiB free")
    est.fits = not est.why_not
    est.fits_with_margin = est.fits and g <= (1 - AUTO_MARGIN) * budget.gpu and c <= (1 - AUTO_MARGIN) * budget.cpu


METHOD = {
    "parameters": "exact: counted on the real-size model built on the meta device",
    "gradients/optimizer": "exact arithmetic (AdamW fp32 moments; DeepSpeed's own ZeRO estimators)",
    "nf4": "exact: bitsandbytes 0.50 NF4 layout (64-element blocks, double-quantized absmax)",
    "activations/temporaries": "measured: one training step traced on fake CPU tensors (MemTracker)",
    "allowance": "modeled: CUDA context 0.75 GiB + 5 % fragmentation (no GPU measured)",
    "cpu at load": "modeled: streaming loader (one shard, one tensor at a time) + the parts the profile keeps on "
                   "the CPU; checkpoint sizes from its safetensors headers, else the catalog",
    "step time": "bounds: traced FLOPs at 165.2 TFLOPS bf16; PCIe 4.0 x16 at 25 GB/s",
}


def plan_experiment(exp: Experiment, gpu_bytes: int, cpu_bytes: int, nvme_path: str | None = None, *,
                    tile_size: int | None = None, builders: head_mod.Builders | None = None,
                    device: str = "cuda", profiles: tuple[str, ...] = SPEED_ORDER, exhaustive: bool = False,
                    loads_checkpoint: bool | None = None, backbone: wl.OwnBackbone | None = None,
                    shape: wl.InputShape | None = None, label: str | None = None,
                    no_backbone: str | None = None) -> Plan:
    """Estimate every profile in `profiles` for `exp` on one GPU of `gpu_bytes` with `cpu_bytes` of RAM.

    A profile whose model states alone exceed the GPU budget is not traced (its GPU figure is then a lower
    bound, flagged); `exhaustive` traces every profile. `loads_checkpoint` (default: whether the experiment names
    pretrained weights) adds the checkpoint read to the CPU load peak. `backbone` replaces the experiment's catalog
    backbone by the same architecture at another size (the validation test plans a small one).

    A model built from a `terratorch fit` file (`trainer.plan.terratorch_plan`) comes with `builders` that hand over
    that model, the `shape` of its first training batch and a `label` for the report; `no_backbone` (the model's
    class name) says it has no backbone terrascale can find, which refuses every profile that adapts one."""
    t0 = time.perf_counter()
    budget = Budget(gpu_bytes, cpu_bytes, nvme_path, device)
    shape = shape or wl.input_shape(exp, tile_size)
    m = Measurer(exp, shape, builders, loads_checkpoint, backbone, model_name=no_backbone)
    estimates = {name: estimate(exp, profile_for(exp, name), budget, m, exhaustive) for name in profiles}
    counts = m.summary()
    vlm = m.own is not None and m.own.family in wl.catalog.VLM_FAMILIES
    mode = exp.model.backbone_kwargs.get("mode", "vision") if vlm else "encoder"
    ck = checkpoint_of(exp, m)
    method = {**METHOD, "checkpoint": ck.source if ck else ("TerraTorch's own loading" if m.loads and m.own is None
                                                            else "none read (random initialisation)")}
    return Plan(label or exp.model.backbone, mode, shape, budget, counts, estimates, method,
                time.perf_counter() - t0, m.measured_now)


def choose_profile(exp: Experiment, gpu_bytes: int, cpu_bytes: int, nvme_path: str | None = None, *,
                   builders: head_mod.Builders | None = None, tile_size: int | None = None,
                   device: str = "cuda", **plan_kwargs) -> tuple[Profile, str, str]:
    """`memory.profile: auto`: (profile, table, reason) for the first profile in `SPEED_ORDER` whose GPU peak and
    CPU need are within `AUTO_MARGIN` of the budget. Raises PlanError with the table when none is.
    `plan_kwargs` go to `plan_experiment` (a `terratorch fit` file's model: shape, label, no_backbone)."""
    plan = plan_experiment(exp, gpu_bytes, cpu_bytes, nvme_path, tile_size=tile_size, builders=builders,
                           device=device, **plan_kwargs)
    table = plan.table()
    name, reason = pick(plan)
    if name is None:
        # a `terratorch fit` file sets its batch size in its datamodule
        batch = "data.init_args.batch_size" if getattr(exp, "terratorch", None) is not None else "data.batch_size"
        raise PlanError(f"no memory profile fits {plan.backbone} in {gpu_bytes / GiB:.1f} GiB of GPU memory and "
                        f"{cpu_bytes / GiB:.1f} GiB of CPU RAM with a {AUTO_MARGIN:.0%} margin:\n{table}\n"
                        f"To fit: lower {batch} or the tile size, give memory.nvme_path (zero3_nvme), raise "
                        "memory.gpu_memory / memory.cpu_memory if the hardware has more, or name a profile that "
                        "fits without the margin ('tight') in memory.profile.")
    return profile_for(exp, name), table, reason
