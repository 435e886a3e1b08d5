"""A plan as a text table (people) or JSON (machines; schema `terrascale.plan/1`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.plan.assumptions import (AUTO_MARGIN, CUDA_CONTEXT_BYTES, FRAGMENTATION, GPU_FLOPS, NVME_READ_PER_S,
                                      NVME_WRITE_PER_S, PCIE_BYTES_PER_S, PEAK_FLOPS, SPEED_ORDER, pick)

if TYPE_CHECKING:
    from trainer.plan.planner import Plan

SCHEMA = "terrascale.plan/1"
GPU_TERMS = ("params", "grads", "optimizer", "activations", "temporaries", "allowance")
GiB = 1 << 30


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f}" if n < 10 * GiB else f"{n / GiB:.1f}"


def _seconds(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return "<1 ms"
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.1f} s"


def step_text(est) -> str:
    parts = [f"compute {_seconds(est.compute_s)}"]
    if est.transfer_s is not None:
        parts.append(f"PCIe {_seconds(est.transfer_s)}")
    if est.nvme_s is not None:
        parts.append(f"NVMe {_seconds(est.nvme_s)}")
    return ", ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def text_table(plan: Plan) -> str:
    s, b = plan.shape, plan.budget
    head = plan.counts.get("head")
    dates = f" x {s.dates} dates" if s.dates > 1 else ""
    mods = f" ({' + '.join(f'{n} {c}' for n, c in s.modalities)})" if s.modalities else ""
    lines = [f"{plan.backbone} ({plan.mode}): batch {s.batch}{dates} x {s.channels} bands{mods} x "
             f"{s.height}x{s.width}, "
             f"{_count(plan.counts.get('backbone', 0))} backbone"
             + (f" + {head / 1e6:.1f}M neck/decoder/head" if head else "") + f" parameters; budget GPU {_gib(b.gpu)} GiB, "
             f"CPU {_gib(b.cpu)} GiB" + (f", NVMe {b.nvme_path}" if b.nvme_path else ""),
             "",
             f"{'profile':<24}{'prec':<5}{'GPU GiB':>8} = {'param':>6}{'grad':>6}{'optim':>6}{'activ':>6}"
             f"{'temp':>6}{'allow':>6}   {'CPU GiB':>7}  {'NVMe':>5}  {'fits':<5} step-time lower bounds"]
    for name, est in plan.estimates.items():
        if est.refused:
            lines.append(f"{name:<24}{est.precision:<5}{est.refused}")
            continue
        g = est.gpu
        fits = "yes" if est.fits_with_margin else ("tight" if est.fits else "no")
        terms = [k if est.traced or k not in ("activations", "temporaries") else None for k in GPU_TERMS]
        lines.append(f"{name:<24}{est.precision:<5}{('>' if not est.traced else '') + _gib(g['total']):>8} = "
                     + "".join(f"{_gib(g[k]) if k else '-':>6}" for k in terms)
                     + f"   {_gib(est.cpu['total']):>7}  {(_gib(est.nvme) if est.nvme else '-'):>5}  {fits:<5} "
                     + step_text(est))
    _, reason = pick(plan)
    lines += ["", f"auto: {reason}"]
    if any(e.why_not for e in plan.estimates.values()):
        lines += ["does not fit:"] + [f"  {n}: {'; '.join(e.why_not)}" for n, e in plan.estimates.items() if e.why_not]
    lines += [f"fits: yes = within {AUTO_MARGIN:.0%} of the budget, tight = fits without that margin. "
              f"CPU = max(loading the model, offloaded states). '>': model states alone exceed the GPU, "
              f"activations not traced.",
              f"Assumed: RTX 4090 {GPU_FLOPS / 1e12:.1f} TFLOPS dense bf16 (fp32 accumulate), PCIe 4.0 x16 "
              f"{PCIE_BYTES_PER_S / 1e9:.0f} GB/s, CUDA context {CUDA_CONTEXT_BYTES / GiB:.2f} GiB + "
              f"{FRAGMENTATION:.0%} fragmentation; no GPU measurement yet (docs/planner.md)."]
    if "checkpoint" in plan.method:
        lines.append(f"checkpoint: {plan.method['checkpoint']}")
    if plan.measured_now:
        lines.append(f"measured now (then cached): {', '.join(plan.measured_now)}; planned in {plan.seconds:.1f} s")
    else:
        lines.append(f"planned in {plan.seconds:.1f} s")
    return "\n".join(line for line in lines if line is not None)


def to_json(plan: Plan) -> dict[str, Any]:
    choice, reason = pick(plan)
    b = plan.budget
    return {
        "schema": SCHEMA,
        "backbone": plan.backbone,
        "mode": plan.mode,
        "input": {"batch": plan.shape.batch, "dates": plan.shape.dates, "channels": plan.shape.channels,
                  "height": plan.shape.height, "width": plan.shape.width,
                  **({"modalities": dict(plan.shape.modalities)} if plan.shape.modalities else {})},
        "budget": {"gpu_bytes": b.gpu, "cpu_bytes": b.cpu, "nvme_path": b.nvme_path, "device": b.device},
        "counts": plan.counts,
        "profiles": [{
            "profile": e.profile, "precision": e.precision, "refused": e.refused,
            "gpu_bytes": dict(e.gpu), "cpu_bytes": dict(e.cpu), "cpu_load_bytes": dict(e.load), "nvme_bytes": e.nvme,
            "fits": e.fits, "fits_with_margin": e.fits_with_margin, "why_not": list(e.why_not),
            "traced": e.traced,
            "step_time_s": {"compute": e.compute_s, "pcie": e.transfer_s, "nvme": e.nvme_s,
                            "lower_bound": e.step_bound_s},
        } for e in plan.estimates.values()],
        "auto": {"profile": choice, "reason": reason},
        "assumptions": {"gpu_bf16_flops": GPU_FLOPS, "pcie_bytes_per_s": PCIE_BYTES_PER_S,
                        "nvme_read_bytes_per_s": NVME_READ_PER_S,
                        "nvme_write_bytes_per_s": NVME_WRITE_PER_S,
                        "cuda_context_bytes": CUDA_CONTEXT_BYTES, "fragmentation": FRAGMENTATION,
                        "auto_margin": AUTO_MARGIN, "speed_order": list(SPEED_ORDER)},
        "method": dict(plan.method),
        "measured_now": list(plan.measured_now),
        "seconds": round(plan.seconds, 3),
    }


def px_rate(px: float | None) -> str:
    if px is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if px >= size:
            return f"{px / size:.3g}{unit}"
    return f"{px:.3g}"


def inference_table(plan) -> str:
    """`launch/plan.py --inference`: memory and compute bound of prediction per weight precision."""
    s, c = plan.shape, plan.counts
    where = "GPU" if plan.device == "cuda" else "device (CPU run)"
    lines = [f"{plan.backbone}: prediction, {s.batch} window(s) per batch of {s.channels} bands x {s.height}x{s.width}"
             + (f" x {s.dates} dates" if s.dates > 1 else "") + (f", {_count(c['backbone'])} backbone + "
             f"{c['head'] / 1e6:.1f}M decoder" if c else "") + (f" + {c['lora'] / 1e6:.1f}M adapters"
                                                                  if c.get("lora") else "")
             + f"; budget {where} {_gib(plan.gpu_budget)} GiB, CPU {_gib(plan.cpu_budget)} GiB", "",
             f"{'precision':<10}{where[:3] + ' GiB':>8} = {'weights':>8}{'dequant':>8}{'activ':>7}{'allow':>7}"
             f"   {'CPU GiB':>7}  {'fits':<5}{'max windows':>12}{'GFLOP/window':>14}{'windows/s':>11}{'px/s':>9}"]
    for name, e in plan.estimates.items():
        if e.refused:
            lines.append(f"{name:<10}{e.refused}")
            continue
        g = e.gpu
        w = e.windows_per_s
        lines.append(f"{name:<10}{_gib(g['total']):>8} = {_gib(g['weights'] + g['buffers']):>8}{_gib(g['dequant']):>8}"
                     f"{_gib(g['activations']):>7}{_gib(g['allowance']):>7}   {_gib(e.cpu['total']):>7}  "
                     f"{'yes' if e.fits else 'no':<5}{e.max_windows:>12}{e.flops_per_window / 1e9:>14.1f}"
                     f"{w:>11.4g}{px_rate(e.px_per_s(s.height, s.width)):>9}")
    lines += ["",
              "Forward only under no_grad, no gradients or optimizer states; activations traced at 1 and 2 windows "
              "per batch (fake tensors), linear in the batch: max windows = the largest batch within the budget. "
              "CPU = the streaming loader's load peak (quantized weights go to the GPU as they arrive).",
              f"Compute bound: traced forward FLOPs per window at the RTX 4090's dense peak, "
              f"{PEAK_FLOPS['bf16'] / 1e12:.1f} TFLOPS bf16 (nf4/int8/bf16: matmuls in bf16) and "
              f"{PEAK_FLOPS['fp32'] / 1e12:.1f} TFLOPS fp32 (NVIDIA Ada architecture whitepaper); windows overlap "
              "in a scene, so scene px/s is lower by the overlap. "
              f"Allowance: CUDA context {CUDA_CONTEXT_BYTES / GiB:.2f} GiB + {FRAGMENTATION:.0%}. "
              "No GPU measurement yet (docs/planner.md)."]
    if plan.measured_now:
        lines.append(f"measured now (then cached): {', '.join(plan.measured_now)}")
    return "\n".join(lines)
