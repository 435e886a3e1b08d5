"""Named memory profiles: one config key (`memory.profile`) turns on what a backbone needs to fit.

A profile is a frozen description; `trainer.model.models` applies it (quantize → LoRA → checkpointing) and
`trainer.train.run` hands its DeepSpeed preset to Accelerate. Each can be adjusted from the config
(`memory.lora.rank=32`, `memory.grad_checkpointing=false`, `memory.deepspeed=my.json`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from trainer.config import MemoryConfig
from trainer.errors import ConfigError
from trainer.memory import deepspeed as ds

if TYPE_CHECKING:
    from trainer.config import Experiment


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # None: the backbone family's own list (`lora_target_modules` on our wrappers, or the defaults below).
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    when: str
    deepspeed: str | None = None  # preset in ds_configs/
    dtype: str = "bf16"  # compute dtype on a GPU; CPU runs use fp32 unless run.precision says otherwise
    quantization: str = "none"  # none | nf4 | int8
    lora: LoraSettings | None = None
    grad_checkpointing: bool = False
    # Parts that stay trainable besides LoRA adapters when LoRA is on.
    trainable: tuple[str, ...] = ("decoder", "neck", "head", "aux_heads")
    cpu_verified: str = ""
    gpu_only: str = ""


_LORA = LoraSettings()

PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("full", "all weights trainable, mixed precision, no ZeRO", "the model, gradients and Adam states fit "
            "on one GPU (see the fit table)",
            cpu_verified="trains, stops, resumes exactly (fp32)", gpu_only="bf16 autocast speed"),
    Profile("zero2", "ZeRO-2: optimizer states and gradients sharded across GPUs", "several GPUs, model fits on each",
            deepspeed="zero2_bf16", cpu_verified="1 and 2 processes (gloo): trains, stops, resumes", gpu_only="NCCL overlap"),
    Profile("zero3", "ZeRO-3: parameters, gradients and optimizer states sharded", "several GPUs, model too big for one",
            deepspeed="zero3_bf16", grad_checkpointing=True, cpu_verified="1 and 2 processes (gloo): trains, stops, resumes"),
    Profile("zero3_offload_optimizer", "ZeRO-3 with Adam states and the fp32 master copy on CPU RAM",
            "weights+grads fit in GPU memory, Adam states do not", deepspeed="zero3_bf16_offload_optimizer",
            grad_checkpointing=True, cpu_verified="1 and 2 processes: trains, stops, resumes", gpu_only="PCIe transfer time"),
    Profile("zero3_offload", "ZeRO-3 with parameters and optimizer states on CPU RAM, streamed per layer",
            "full fine-tuning of a model far larger than GPU memory, enough CPU RAM",
            deepspeed="zero3_bf16_offload_all", grad_checkpointing=True,
            cpu_verified="1 and 2 processes: straight run == interrupted + resumed run", gpu_only="PCIe transfer time, pinned memory"),
    Profile("zero3_nvme", "ZeRO-Infinity: parameters and optimizer states on an NVMe path (async io)",
            "CPU RAM is too small for the offloaded states", deepspeed="zero3_bf16_nvme", grad_checkpointing=True,
            cpu_verified="1 process where DeepSpeed's async_io op builds (libaio): trains, swaps, resumes", gpu_only="NVMe bandwidth"),
    Profile("lora", "frozen bf16 backbone, LoRA adapters + decoder/head trainable", "backbone weights fit in "
            "GPU memory in bf16, its gradients and Adam states do not", lora=_LORA, grad_checkpointing=True,
            cpu_verified="trains, resumes; adapters and merged export reproduce outputs; bf16 run holds a loaded checkpoint's frozen weights in bf16"),
    Profile("qlora", "backbone linears in 4-bit NF4 (double quant, bf16 compute), LoRA on top",
            "backbone does not fit in bf16; single GPU", quantization="nf4", lora=_LORA, grad_checkpointing=True,
            cpu_verified="bitsandbytes CPU backend: a sharded checkpoint quantized layer by layer on arrival; NF4 trains, resumes; dequantized merge reproduces outputs", gpu_only="CUDA NF4 kernels, speed"),
    Profile("zero3_offload_lora", "bf16 backbone streamed from CPU by ZeRO-3, LoRA trainable",
            "26-40B backbones on one 24 GB GPU with LoRA", deepspeed="zero3_bf16_offload_all", lora=_LORA,
            grad_checkpointing=True, cpu_verified="1 and 2 processes: a sharded checkpoint loaded into the ZeRO-3 partitions; trains, resumes, merged export", gpu_only="PCIe transfer time"),
    Profile("auto", "chosen by the planner: the fastest profile that fits the GPU", "you do not know which fits",
            cpu_verified="chooses and trains"),
]}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        import difflib

        near = difflib.get_close_matches(name, PROFILES, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError([f"memory.profile: unknown profile {name!r}; {hint}choose one of {', '.join(PROFILES)}"])
    return PROFILES[name]


def resolve_profile(memory: MemoryConfig) -> Profile:
    """The named profile with the experiment's adjustments applied (`memory.lora.rank=32`, ...)."""
    p = get_profile(memory.profile)
    changes: dict = {}
    if memory.deepspeed is not None:
        changes["deepspeed"] = memory.deepspeed
    if memory.grad_checkpointing is not None:
        changes["grad_checkpointing"] = memory.grad_checkpointing
    if memory.quantization is not None:
        changes["quantization"] = memory.quantization
    if memory.lora is not None:
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in memory.lora.model_dump().items()
                 if v is not None}
        changes["lora"] = replace(p.lora or LoraSettings(), **given)
    return replace(p, **changes) if changes else p


def profile_for(exp: Experiment, name: str) -> Profile:
    """Profile `name` with the experiment's adjustments (LoRA rank, checkpointing...) applied; the experiment's own
    DeepSpeed JSON (memory.deepspeed) only for the profile the experiment names. The run resolves its profile with
    `profile_for(exp, exp.memory.profile)` (once `auto` is replaced by the choice), the planner every candidate."""
    own = name == exp.memory.profile
    memory = exp.memory.model_copy(update={"profile": name, "deepspeed": exp.memory.deepspeed if own else None})
    return resolve_profile(memory)


def precision_for(exp: Experiment, profile: Profile, on_gpu: bool) -> str:
    """The precision a run of `profile` trains in: run.precision, or for `auto` the profile's dtype on a GPU and
    fp32 on a CPU (bf16 on this class of CPU is ~10x slower than fp32). The run asks with `on_gpu` = CUDA is
    available, the planner with whether it plans a GPU run (`Budget.device == "cuda"`)."""
    if exp.run.precision != "auto":
        return exp.run.precision
    return profile.dtype if on_gpu else "fp32"


_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def compute_dtype(precision: str):
    """The torch dtype a precision (run.precision's values, or what `precision_for` returns) computes in: the run's
    backbone load and casts and the planner's traces both take it from here."""
    import torch  # here, not at the top: the profile rules stay importable without torch

    return getattr(torch, _TORCH_DTYPES[precision])


def check_combination(p: Profile, zero_stage: int, offloads: dict[str, str]) -> None:
    """Refuse the combinations known to be bad, each with the reason. All problems at once."""
    problems = []
    if p.quantization != "none" and p.lora is None:
        problems.append(f"memory.quantization={p.quantization} without LoRA: quantized weights cannot be trained; "
                        "use profile qlora or set memory.lora.rank")
    if p.quantization != "none" and zero_stage == 3 and "param" in offloads:
        problems.append("memory.quantization with ZeRO-3 parameter offload raises GPU memory instead of lowering it "
                        "(peft's DeepSpeed guide: 4-bit + offload_param is unsupported); use zero3_offload_lora "
                        "(bf16 weights streamed from CPU) or qlora without DeepSpeed")
    if p.quantization != "none" and "nvme" in offloads.values():
        problems.append("memory.quantization with NVMe offload is not supported by bitsandbytes/DeepSpeed; use "
                        "zero3_nvme without quantization")
    if problems:
        raise ConfigError(problems)


def check_deepspeed(exp: Experiment, p: Profile, ds_config: dict | None) -> None:
    """`check_combination` against the profile's rendered DeepSpeed config (None: no DeepSpeed, ZeRO stage 0) and
    the optimizer states it can step (`optimizer_refusal`), all problems at once: the run refuses with them before
    it builds the model, the planner marks the profile refused with the same words (so `auto` never picks it)."""
    problems = []
    try:
        check_combination(p, ds.zero_stage(ds_config) if ds_config else 0, ds.offloads(ds_config) if ds_config else {})
    except ConfigError as e:
        problems += e.issues
    if refusal := optimizer_refusal(exp, p, ds_config):
        problems.append(refusal)
    if problems:
        raise ConfigError(problems)


def optimizer_refusal(exp: Experiment, p: Profile, ds_config: dict | None) -> str | None:
    """Why `exp.memory.optimizer` cannot run with this DeepSpeed config (None: it can). DeepSpeed ZeRO steps its own
    flat fp32 partitions (or DeepSpeedCPUAdam on offloaded ones) and refuses optimizers it has not tested; 8-bit
    states there are unverified, so they are refused, not attempted (part of `check_deepspeed`)."""
    states = exp.memory.optimizer
    if states == "adamw" or ds_config is None:
        return None
    source = exp.memory.deepspeed or f"the DeepSpeed preset of memory.profile {p.name}"
    owner = (f"its own {ds_config['optimizer'].get('type', '')} optimizer" if "optimizer" in ds_config
             else f"ZeRO-{ds.zero_stage(ds_config)} partitions")
    return (f"memory.optimizer: {states!r} cannot run under DeepSpeed ({source}: {owner}); use memory.optimizer: "
            "adamw with this profile, or a profile without DeepSpeed (full, lora, qlora) for 8-bit optimizer states")


def adapts_backbone(p: Profile) -> bool:
    """The profile changes the backbone itself (LoRA adapters, quantized linears, checkpointed blocks), so it needs
    a model whose backbone terrascale can find."""
    return p.lora is not None or p.quantization != "none" or p.grad_checkpointing


def no_backbone_problem(p: Profile, model_name: str) -> str:
    """Why `p` cannot run on a model with no backbone terrascale can find (the run refuses it, the planner
    leaves it out of `auto`'s candidates with the same words)."""
    return (f"memory.profile: {p.name} adapts the backbone, but {model_name} has none terrascale can find (encoder / "
            "smp_model.encoder / unet_model); use profile full or zero2 (or a ZeRO-3 profile with "
            "memory.grad_checkpointing=false)")


def no_backbone_refusal(p: Profile, no_backbone: str | None) -> str | None:
    """`no_backbone_problem` when the model has no backbone terrascale can find (`no_backbone`: its class name)
    and `p` adapts one, else None: the run raises it, the planner shows it as the profile's refusal."""
    if no_backbone is not None and adapts_backbone(p):
        return no_backbone_problem(p, no_backbone)
    return None


def markdown_table() -> str:
    """The README's profile table, generated from PROFILES (a unit test keeps the README in sync)."""
    rows = ["| profile | what it does | when to use it | DeepSpeed preset | verified on CPU here | only on a GPU |",
            "|---|---|---|---|---|---|"]
    for p in PROFILES.values():
        extras = [x for x in (p.quantization != "none" and f"{p.quantization} weights",
                              p.lora and f"LoRA r={p.lora.rank}", p.grad_checkpointing and "grad checkpointing") if x]
        what = p.summary + (f" ({', '.join(extras)})" if extras else "")
        rows.append(f"| `{p.name}` | {what} | {p.when} | {p.deepspeed or '—'} | {p.cpu_verified or '—'} | "
                    f"{p.gpu_only or '—'} |")
    return "\n".join(rows)
