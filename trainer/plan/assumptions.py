"""The planner's assumptions about the GPU it plans for (no GPU has measured them yet; docs/planner.md), and the
rule that picks a profile from a plan with them (`pick`).

Below both the planners (`planner`, `inference`) and their renderings (`plan_report`), which all read them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.plan.planner import Plan

GiB = 1 << 30

# RTX 4090 BF16 tensor-core throughput with FP32 accumulate, dense: 165.2 TFLOPS (NVIDIA Ada GPU architecture
# whitepaper, GeForce RTX 4090 specifications; 330.3 is the 2:4-sparse figure).
GPU_FLOPS = 165.2e12
PCIE_BYTES_PER_S = 25e9     # PCIe 4.0 x16: 31.5 GB/s raw per direction; ~25 GB/s with pinned host buffers
NVME_READ_PER_S, NVME_WRITE_PER_S = 7e9, 6e9  # a PCIe 4.0 x4 NVMe drive, sequential
CUDA_CONTEXT_BYTES = 768 << 20  # CUDA context + cuBLAS/cuDNN workspaces on the GPU before any tensor
FRAGMENTATION = 0.05        # PyTorch caching allocator: block rounding and fragmentation, share of tensor peak
PLAN_WORLD_SIZE = 1         # every profile is planned for one process on one GPU (ZeRO shards nothing)
AUTO_MARGIN = 0.10          # `auto` wants the GPU peak and CPU need at most 90 % of the budget
# Fastest first, for one GPU (reasoning in docs/planner.md). On one GPU ZeRO shards nothing: zero2 needs more
# GPU memory than full, zero3 more than lora; they are ranked by speed but can only win on several GPUs.
SPEED_ORDER = ("full", "zero2", "lora", "zero3", "qlora", "zero3_offload_optimizer", "zero3_offload_lora",
               "zero3_offload", "zero3_nvme")
# NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: 165.2 TFLOPS dense BF16 tensor (FP32 accumulate),
# 82.6 TFLOPS FP32 (non-tensor; PyTorch keeps TF32 matmuls off by default, and TF32 tensor is also 82.6 dense).
PEAK_FLOPS = {"bf16": GPU_FLOPS, "fp32": 82.6e12}


def pick(plan: Plan) -> tuple[str | None, str]:
    """(profile name or None, reason): the first of `SPEED_ORDER` that fits with `AUTO_MARGIN` to spare."""
    for name in SPEED_ORDER:
        est = plan.estimates.get(name)
        if est is not None and est.fits_with_margin:
            return name, (f"{name}, the fastest profile that fits with {AUTO_MARGIN:.0%} to spare (GPU "
                          f"{est.gpu['total'] / GiB:.1f} of {plan.budget.gpu / GiB:.1f} GiB, CPU "
                          f"{est.cpu['total'] / GiB:.1f} of {plan.budget.cpu / GiB:.1f} GiB)")
    tight = [n for n, e in plan.estimates.items() if e.fits]
    return None, "no profile fits with a {:.0%} margin{}".format(
        AUTO_MARGIN, f" ({', '.join(tight)} fit without it)" if tight else "")
