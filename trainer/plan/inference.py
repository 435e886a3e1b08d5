"""Prediction memory and speed: GPU and CPU memory per window batch, and the compute bound, per weight precision.

Same measurements as the training plan (`Measurer`: meta-device counts, `FakeTensorMode` traces at reduced depth
extrapolated in depth, the decoder traced apart, all cached), but the traced pass is the forward alone under
`torch.no_grad()` (`trace.trace_forward`) in the compute dtype, and there are no gradients or optimizer states:

- weights: `fp32` 4 B and `bf16` 2 B per parameter; `nf4` the backbone's linear weights in bitsandbytes' NF4 layout
  (`states.nf4_bytes`) and everything else in bf16; `int8` 1 B per backbone linear weight (LLM.int8: the per-row
  fp32 scales, 4 B per output row, are not counted: < 0.4 % for layers >= 1024 wide) and the rest in bf16;
  adapters and decoder in the compute dtype;
- nf4/int8: one dequantized copy of the largest linear weight in the compute dtype (as the training plan);
- activations: the forward's peak above the weights, traced at 1 and 2 windows per batch and extrapolated
  linearly in the batch (`max_windows` solves for the budget);
- allowance: CUDA context + fragmentation, as the training plan;
- CPU RAM: the streaming loader's load peak (`load_ram.streamed_peak`) with nothing trainable: quantized weights
  go to the GPU as they arrive, bf16/fp32 models are assembled on the CPU first;
- compute bound: traced forward FLOPs per window at the GPU's dense peak for the compute dtype (`PEAK_FLOPS`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer.config import Experiment
from trainer.errors import ConfigError
from trainer.memory import states as st
from trainer.plan import head as head_mod
from trainer.plan import load_ram as lr
from trainer.plan import workload as wl
from trainer.plan.assumptions import PEAK_FLOPS  # noqa: F401  (public here)
from trainer.plan.measure import Measurer
from trainer.plan.planner import CUDA_CONTEXT_BYTES, FRAGMENTATION, GPU_FLOPS, GiB, checkpoint_of

PRECISIONS = ("nf4", "int8", "bf16", "fp32")
COMPUTE = {"nf4": "bf16", "int8": "bf16", "bf16": "bf16", "fp32": "fp32"}
MAX_WINDOWS = 4096  # the search for the largest batch stops here


@dataclass
class InferenceEstimate:
    precision: str
    compute: str
    windows: int                                   # windows per batch the memory figures are for
    gpu: dict[str, int] = field(default_factory=dict)  # weights, dequant, buffers, activations, allowance, total
    cpu: dict[str, int] = field(default_factory=dict)  # the load peak by part (load_ram) + total
    flops_per_window: int = 0
    per_window: int = 0                            # activation bytes each extra window adds
    max_windows: int = 0                           # largest batch within the GPU budget (0: not even one)
    fits: bool = False
    refused: str | None = None

    @property
    def windows_per_s(self) -> float | None:
        return PEAK_FLOPS[self.compute] / self.flops_per_window if self.flops_per_window else None

    def px_per_s(self, height: int, width: int) -> float | None:
        w = self.windows_per_s
        return None if w is None else w * height * width


@dataclass
class InferencePlan:
    backbone: str
    shape: wl.InputShape                           # one window (batch = windows per batch)
    device: str
    gpu_budget: int
    cpu_budget: int
    counts: dict[str, int]
    estimates: dict[str, InferenceEstimate]
    measured_now: list[str]

    def to_json(self) -> dict[str, Any]:
        s = self.shape
        return {"schema": "terrascale.inference_plan/1", "backbone": self.backbone, "device": self.device,
                "window": {"channels": s.channels, "height": s.height, "width": s.width, "dates": s.dates},
                "windows_per_batch": s.batch, "gpu_budget": self.gpu_budget, "cpu_budget": self.cpu_budget,
                "counts": self.counts, "peak_flops": PEAK_FLOPS,
                "estimates": {p: {**dataclasses.asdict(e), "windows_per_s": e.windows_per_s,
                                  "px_per_s": e.px_per_s(s.height, s.width)} for p, e in self.estimates.items()},
                "measured_now": self.measured_now}

    def table(self) -> str:
        from trainer.plan.plan_report import inference_table

        return inference_table(self)


def weight_bytes(c: dict, precision: str) -> int:
    """Bytes of every weight (backbone, adapters, decoder) held in `precision` for prediction."""
    p = wl.BYTES[COMPUTE[precision]]
    rest = c["head"] + c.get("lora", 0)
    if precision == "nf4":
        return st.nf4_total(c["linear_numels"]) + p * (c["total"] - c["linear_weights"] + rest)
    if precision == "int8":
        return c["linear_weights"] + p * (c["total"] - c["linear_weights"] + rest)
    return p * (c["total"] + rest)


def _counts(c: dict, lora: int) -> st.Counts:
    return st.Counts(backbone=c["total"], head=c["head"], lora=lora, linear_weights=c["linear_weights"],
                     linear_numels=c["linear_numels"], linear_biases=c["linear_biases"],
                     largest_linear=c["largest_linear"], largest_layer=max(c["largest_layer"], c["head_largest"]),
                     persistent=0, trainable=0)


def _lora_params(exp: Experiment, m: Measurer) -> int:
    """Adapters the job trained (its memory.profile's LoRA), carried on top of the base at prediction."""
    from trainer.memory.profiles import profile_for

    if exp.memory.profile == "auto" or m.own is None:
        return 0
    profile = profile_for(exp, exp.memory.profile)
    return m.own_counts(profile)["lora"] if profile.lora else 0


def plan_inference(exp: Experiment, gpu_bytes: int, cpu_bytes: int, *, windows: int | None = None,
                   precisions: tuple[str, ...] = PRECISIONS, tile_size: int | None = None,
                   builders: head_mod.Builders | None = None, device: str = "cuda",
                   loads_checkpoint: bool | None = None, backbone: wl.OwnBackbone | None = None) -> InferencePlan:
    """Prediction of `exp`'s model with `windows` windows per batch (default data.batch_size) of its tile size,
    for each weight precision in `precisions`, on one GPU of `gpu_bytes` (`device="cpu"`: a CPU run, no CUDA
    context or fragmentation allowance)."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ConfigError([f"--precision {', '.join(bad)}: choose from {', '.join(PRECISIONS)}"])
    base = wl.input_shape(exp, tile_size)
    n = windows or base.batch
    if n < 1:
        raise ConfigError([f"--windows {n}: give at least 1 window per batch"])
    # one Measurer per batch size (its memo is keyed by trace mode); counts and traces are cached on disk
    m1 = Measurer(exp, dataclasses.replace(base, batch=1), builders, loads_checkpoint, backbone)
    m2 = Measurer(exp, dataclasses.replace(base, batch=2), builders, loads_checkpoint, m1.own)
    lora = _lora_params(exp, m1)
    estimates, counts = {}, {}
    for precision in precisions:
        compute = COMPUTE[precision]
        est = InferenceEstimate(precision, compute, n)
        try:
            c, d1 = m1.forward(compute)
            _, d2 = m2.forward(compute)
        except RuntimeError as e:  # an op the model cannot run in this dtype (shown in the row, not hidden)
            est.refused = f"cannot run the forward in {compute}: {str(e).splitlines()[0][:160]}"
            estimates[precision] = est
            continue
        counts = {"backbone": c["total"], "linear_weights": c["linear_weights"], "head": c["head"], "lora": lora}
        c = {**c, "lora": lora}
        quantized = precision in ("nf4", "int8")
        fixed = dict(weights=weight_bytes(c, precision),
                     dequant=st.dequant_buffer(c["largest_linear"], wl.BYTES[compute]) if quantized else 0,
                     buffers=d1["buffers"])
        est.per_window = max(0, d2["peak"] - d1["peak"])
        first = d1["peak"] - est.per_window  # what does not grow with the batch

        def total(k: int) -> tuple[dict[str, int], int]:
            gpu = {**fixed, "activations": first + k * est.per_window}
            tensors = sum(gpu.values())
            gpu["allowance"] = int(CUDA_CONTEXT_BYTES + FRAGMENTATION * tensors) if device == "cuda" else 0
            return gpu, tensors + gpu["allowance"]

        est.gpu, est.gpu["total"] = total(n)[0], total(n)[1]
        est.max_windows = _largest(lambda k: total(k)[1] <= gpu_bytes)
        load = lr.streamed_peak(_counts(c, lora), checkpoint_of(exp, m1),
                                lr.LoadCase(quantized and device == "cuda", None, wl.BYTES[compute])) \
            if m1.own is not None else lr.whole_peak(_counts(c, lora), lr.Checkpoint(
                "fp32 state dict", 0, 4, 4 * c["total"]) if m1.loads else None)
        est.cpu = dict(load)
        if device == "cpu":  # the CPU is the device: the process baseline plus what runs
            est.cpu["total"] = max(load["total"], lr.PROCESS_BASELINE + est.gpu["total"])
        est.flops_per_window = d1["flops"]
        est.fits = est.gpu["total"] <= gpu_bytes and est.cpu["total"] <= cpu_bytes
        estimates[precision] = est
    return InferencePlan(exp.model.backbone, dataclasses.replace(base, batch=n), device, gpu_bytes, cpu_bytes,
                         counts, estimates, [*dict.fromkeys(m1.measured_now + m2.measured_now)])


def _largest(ok) -> int:
    """Largest k in [1, MAX_WINDOWS] with ok(k) (monotone), 0 when ok(1) is false."""
    if not ok(1):
        return 0
    lo, hi = 1, MAX_WINDOWS
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


__all__ = ["InferenceEstimate", "InferencePlan", "PEAK_FLOPS", "PRECISIONS", "plan_inference", "weight_bytes", "GiB"]
