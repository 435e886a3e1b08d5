"""Model states (parameters, gradients, optimizer states) per profile, and the per-step traffic bounds.

Pure arithmetic on exact counts. Where a library defines the layout, its definition is used:
- NF4 storage as bitsandbytes 0.50 lays it out (`functional.quantize_4bit`, compress_statistics=True);
- ZeRO-2/ZeRO-3 model states from DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`, the functions `..._all_cold` prints), generalised to frozen
  parameters in the one way that reproduces DeepSpeed's numbers when everything trains (unit-tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# --- bitsandbytes NF4 -------------------------------------------------------------------------------------
NF4_BLOCK = 64          # quantize_4bit default blocksize: one absmax per 64 weights
NF4_DQ_BLOCK = 256      # compress_statistics: absmax quantized to uint8 in blocks of 256 (quantize_blockwise)
NF4_PER_TENSOR = 256 * 4 + 16 * 4 + 4  # the 8-bit dynamic map (256 fp32), the NF4 code (16 fp32), the offset


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes keeps for one NF4 weight of `numel` elements (double quantization)."""
    packed = math.ceil(numel / 2)                      # two 4-bit values per byte (odd sizes padded)
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax_u8 = blocks                                 # quantized absmax, one byte per block
    absmax2 = 4 * math.ceil(blocks / NF4_DQ_BLOCK)     # fp32 scale per 256 absmax values
    return packed + absmax_u8 + absmax2 + NF4_PER_TENSOR


def nf4_total(linear_numels: dict[str, int]) -> int:
    return sum(nf4_bytes(int(numel)) * count for numel, count in linear_numels.items())


def dequant_buffer(largest_linear: int, compute_bytes: int) -> int:
    """The largest weight dequantized for a matmul: `dequantize_4bit` returns the quantization state's dtype, which
    is the compute dtype (trainer.model.fitting quantizes weights held in it), so one compute-dtype copy per matmul
    (backward's `.to(grad.dtype)` is then a no-op)."""
    return largest_linear * compute_bytes


# --- optimizer states -----------------------------------------------------------------------------------
BNB_8BIT_BLOCK = 256  # bitsandbytes 0.50 Optimizer2State.init_state: blockwise 8-bit states, one fp32 absmax each


def optimizer_state_bytes(kind: str, trainable: int) -> int:
    """Bytes of optimizer state for `trainable` parameters (`memory.optimizer`, or `optim.name: sgd`).

    adamw: exp_avg + exp_avg_sq in fp32 (8 B). adamw_8bit / paged_adamw_8bit (bitsandbytes): both moments uint8 plus
    one fp32 absmax per 256-element block each (2 + 8/256 B); bitsandbytes keeps fp32 states for tensors under
    `min_8bit_size` (4096 elements), which this count treats as 8-bit. Paged states live in CUDA unified memory and
    can be evicted to the CPU under pressure: counted on the GPU (the case without pressure). sgd: the momentum
    buffer (4 B)."""
    if kind in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * trainable + 2 * 4 * math.ceil(trainable / BNB_8BIT_BLOCK)
    return (4 if kind == "sgd" else 8) * trainable


# --- DeepSpeed ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_param: str | None       # "cpu" | "nvme" | None
    offload_optimizer: str | None
    reduce_bucket: int              # elements
    prefetch_bucket: int            # elements (stage 3)
    persistence_threshold: int      # stage 3: parameters this small stay on the GPU
    overlap_comm: bool
    nvme_swap: int = 0              # elements of pinned swap buffers for NVMe parameter offload


def zero_settings(cfg: dict) -> ZeroSettings:
    z = cfg.get("zero_optimization", {})

    def dev(what: str) -> str | None:
        d = (z.get(f"offload_{what}") or {}).get("device")
        return None if d in (None, "none") else d

    op = z.get("offload_param") or {}
    # DeepSpeed's defaults for NVMe parameter swapping: 5 buffers of 1e8 elements, 1e9 elements cached in CPU
    swap = (op.get("buffer_count", 5) * op.get("buffer_size", 1e8) + op.get("max_in_cpu", 1e9)
            if dev("param") == "nvme" else 0)
    return ZeroSettings(stage=int(z.get("stage", 0)), offload_param=dev("param"), offload_optimizer=dev("optimizer"),
                        reduce_bucket=int(z.get("reduce_bucket_size", 5e8)),
                        prefetch_bucket=int(z.get("stage3_prefetch_bucket_size", 5e7)),
                        persistence_threshold=int(z.get("stage3_param_persistence_threshold", 1e5)),
                        overlap_comm=bool(z.get("overlap_comm", False)), nvme_swap=int(swap))


# DeepSpeed's CPU estimate multiplies by this for pinned buffers and allocator slack (its default).
DS_CPU_BUFFER_FACTOR = 1.5


def ds_zero3(total: int, largest_layer: int, offload_optimizer: bool, offload_param: bool) -> tuple[int, int]:
    """(cpu, gpu) bytes from DeepSpeed's estimator, one GPU. zero_init=False: trainer.train.run builds the model on the
    CPU and DeepSpeed partitions it at `prepare`, not under `zero.Init`."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest_layer, num_gpus_per_node=1, num_nodes=1,
                                                        cpu_offload=offload_optimizer, cpu_offload_params=offload_param,
                                                        zero_init=False,
                                                        additional_buffer_factor=DS_CPU_BUFFER_FACTOR)
    return int(cpu), int(gpu)


def ds_zero2(total: int, offload_optimizer: bool) -> tuple[int, int]:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=1, num_nodes=1,
                                                     cpu_offload=offload_optimizer,
                                                     additional_buffer_factor=DS_CPU_BUFFER_FACTOR)
    return int(cpu), int(gpu)


# --- the terms ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    backbone: int            # backbone parameters as the run builds them
    head: int                # necks + decoder + head (always trainable)
    lora: int                # adapter parameters (0 without LoRA)
    linear_weights: int      # backbone nn.Linear weights (what NF4 quantizes)
    linear_numels: dict      # {numel: count} of those weights
    linear_biases: int
    largest_linear: int
    largest_layer: int       # DeepSpeed's definition, whole model
    persistent: int          # ZeRO-3 parameters at or under the persistence threshold
    trainable: int           # what the optimizer updates

    @property
    def all(self) -> int:
        return self.backbone + self.head + self.lora


@dataclass(frozen=True)
class States:
    gpu_params: int
    gpu_grads: int          # gradients held until the optimizer step
    gpu_optimizer: int
    gpu_buffers: int        # DeepSpeed's buckets and gathered-layer working set (shown as temporaries)
    cpu: int                # CPU RAM the profile keeps during training (offloaded states); load peak apart
    nvme: int = 0
    h2d_bytes: int = 0      # per optimizer step over PCIe, host → device (lower bound)
    d2h_bytes: int = 0
    nvme_read: int = 0
    nvme_write: int = 0


def accelerate_states(c: Counts, compute_bytes: int, nf4: bool, optimizer_bytes: int | None = None) -> States:
    """No DeepSpeed: trainable parameters fp32 (autocast computes in the compute dtype), their fp32 gradients and
    the optimizer's states (`optimizer_bytes`, default AdamW's two fp32 moments); frozen parameters in the compute
    dtype (trainer.model.fitting.cast_frozen; fp32 on a CPU run). NF4: backbone linears as bitsandbytes stores them."""
    frozen = c.all - c.trainable
    params = 4 * c.trainable + compute_bytes * frozen
    if nf4:
        params = nf4_total(c.linear_numels) + compute_bytes * (frozen - c.linear_weights) + 4 * c.trainable
    opt = optimizer_state_bytes("adamw", c.trainable) if optimizer_bytes is None else optimizer_bytes
    return States(params, 4 * c.trainable, opt, 0, 0)


def zero_states(c: Counts, p: int, zero: ZeroSettings, micro_steps: int) -> States:
    """DeepSpeed ZeRO on one GPU, `p`-byte model (the run casts it to bf16). Breakdown of DeepSpeed's numbers:
    16-bit params (p) + 16-bit grads (p, ZeRO-2) + fp32 grads (4) + fp32 master and Adam moments (12)."""
    t, frozen = c.trainable, c.all - c.trainable
    opt_off, par_off = zero.offload_optimizer is not None, zero.offload_param is not None
    if zero.stage in (1, 2):
        cpu, gpu = ds_zero2(t, opt_off)
        buckets = zero.reduce_bucket * p * (2 if zero.overlap_comm else 1)
        if opt_off:
            return States(p * c.all, p * t, 0, buckets, cpu, h2d_bytes=p * t, d2h_bytes=p * t)
        assert gpu == 20 * t, "DeepSpeed's ZeRO-2 estimate changed: revisit the breakdown"
        return States(p * c.all, (p + 4) * t, 12 * t, buckets, 0)
    cpu, gpu = ds_zero3(t, c.largest_layer, opt_off, par_off)
    working = 4 * c.largest_layer  # DeepSpeed's term: the largest layer's gathered 16-bit params and grads
    buffers = working + p * (zero.reduce_bucket + zero.prefetch_bucket)
    # Persistent (small) parameters are never partitioned; with parameter offload they stay on the GPU.
    gpu_params = p * c.persistent if par_off else p * c.all
    if not opt_off:
        assert gpu == working + 18 * t, "DeepSpeed's ZeRO-3 estimate changed: revisit the breakdown"
        return States(gpu_params, 4 * t, 12 * t, buffers, 0)
    # DeepSpeed's estimator assumes every parameter trains; a frozen one is only its 16-bit copy.
    cpu += int(p * frozen * DS_CPU_BUFFER_FACTOR) if par_off else 0
    if not par_off:  # gradients out, updated 16-bit parameters back, once per optimizer step
        return States(gpu_params, 0, 0, buffers, cpu, h2d_bytes=p * t, d2h_bytes=p * t)
    # Every 16-bit parameter crosses PCIe in forward and again in backward (a lower bound: recomputation
    # may fetch it a third time); gradients go out once per optimizer step.
    h2d, d2h = micro_steps * 2 * p * c.all, p * t
    if "nvme" not in (zero.offload_param, zero.offload_optimizer):
        return States(gpu_params, 0, 0, buffers, cpu, h2d_bytes=h2d, d2h_bytes=d2h)
    # ZeRO-Infinity (modeled): 16-bit params and fp32 master/exp_avg/exp_avg_sq on the NVMe path, fp32 grads
    # and swap buffers in pinned CPU memory.
    nvme = p * c.all + 12 * t
    cpu_nvme = int((4 * t + p * zero.nvme_swap) * DS_CPU_BUFFER_FACTOR)
    return States(gpu_params, 0, 0, buffers, cpu_nvme, nvme, h2d, d2h,
                  nvme_read=micro_steps * 2 * p * c.all + 12 * t, nvme_write=12 * t + p * t)

