"""Apply a memory profile to a built model, in the only order that works: quantize → LoRA → checkpointing.

(DeepSpeed comes last, in `trainer.train.run`, when Accelerate prepares the model.)

- Quantization replaces the backbone's `nn.Linear` layers by bitsandbytes `Linear4bit` (NF4, double
  quantization) or `Linear8bitLt` carrying the original weights; decoder, necks and head stay full precision.
- LoRA wraps the backbone with peft (`get_peft_model`), so adapters can be saved with `save_pretrained` and
  merged with `merge_and_unload`; everything outside the backbone stays trainable.
- Gradient checkpointing uses the backbone's own switch when it has one (Hugging Face, timm), else wraps each
  transformer block's forward in non-reentrant `torch.utils.checkpoint` (Prithvi, TerraMind have no switch).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import nn

from trainer.backbones.stream import training_numerics
from trainer.errors import ConfigError
from trainer.memory.profiles import Profile

log = logging.getLogger(__name__)

# LoRA targets of timm-style ViTs (Prithvi, TerraMind, Clay, SatMAE). Dotted suffixes, so that e.g. the patch
# embedding's `proj` is not adapted.
VIT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_BLOCK_LISTS = ("blocks", "encoder", "layers", "layer")


def lora_targets(encoder: nn.Module, profile: Profile) -> list[str]:
    if profile.lora and profile.lora.target_modules:
        return list(profile.lora.target_modules)
    return list(getattr(encoder, "lora_target_modules", None) or VIT_LORA_TARGETS)


def _linear_layers(module: nn.Module):
    return [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]


def quantize_linears(encoder: nn.Module, kind: str, compute_dtype: torch.dtype,
                     quant_storage: torch.dtype = torch.uint8) -> int:
    """Swap every `nn.Linear` of `encoder` for a bitsandbytes layer holding the same weights. Returns the count."""
    import bitsandbytes as bnb

    layers = _linear_layers(encoder)
    for name, lin in layers:
        parent = encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else encoder
        device = lin.weight.device
        if kind == "nf4":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=quant_storage, device="meta")
            training_numerics(q)
            # quantized from the compute dtype (no fp32 copy of the layer on a bf16 run)
            q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4", quant_storage=quant_storage)
        elif kind == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            raise ConfigError([f"memory.quantization: unknown kind {kind!r}; use none, nf4 or int8"])
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        # Moving to the device is what quantizes the weights (bitsandbytes' design).
        setattr(parent, name.rsplit(".", 1)[-1], q.to(device if device.type != "meta" else "cpu"))
    return len(layers)


def dequantized_weight(m: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes Linear4bit/Linear8bitLt, dequantized (the module is untouched)."""
    import copy

    import bitsandbytes as bnb

    if isinstance(m, bnb.nn.Linear4bit):
        data, state = m.weight.data, m.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # an eval forward on an AVX512-bf16 CPU repacked the weight for its kernel (bitsandbytes does so in
            # place); undo it on a copy, as bitsandbytes' own state_dict does
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)
    return m.weight.data.float() * m.weight.SCB.float().unsqueeze(1) / 127.0


def _get(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _set(model: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, name, value)


def add_lora(model: nn.Module, profile: Profile, encoder_path: str = "encoder") -> None:
    from peft import LoraConfig, get_peft_model

    encoder = _get(model, encoder_path)
    targets = lora_targets(encoder, profile)
    cfg = LoraConfig(r=profile.lora.rank, lora_alpha=profile.lora.alpha, lora_dropout=profile.lora.dropout,
                     target_modules=targets, bias="none")
    try:
        _set(model, encoder_path, get_peft_model(encoder, cfg))
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError([f"memory.lora.target_modules: {targets} match no layer of the backbone ({e}); "
                           "name module suffixes that exist, e.g. attn.qkv"]) from e


def _block_list(encoder: nn.Module) -> nn.ModuleList | None:
    for attr in _BLOCK_LISTS:
        blocks = getattr(encoder, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    return None


def _checkpointed(block: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not block.training:
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def enable_grad_checkpointing(encoder: nn.Module) -> str:
    """Returns how it was enabled (for the log). State-dict keys are unchanged whichever way."""
    base = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder
    if hasattr(base, "gradient_checkpointing_enable"):
        switch = base.gradient_checkpointing_enable
        if "gradient_checkpointing_kwargs" in inspect.signature(switch).parameters:  # Hugging Face models
            switch(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:  # our own wrappers: always non-reentrant
            switch()
        return "backbone switch"
    if hasattr(base, "set_grad_checkpointing"):
        base.set_grad_checkpointing(True)
        return "timm switch"
    blocks = _block_list(base)
    if blocks is None:
        raise ConfigError([f"memory.grad_checkpointing: the backbone {type(base).__name__} has no checkpointing "
                           "switch and no block list (blocks/encoder/layers); set memory.grad_checkpointing=false"])
    for block in blocks:
        block.forward = _checkpointed(block, block.forward)
    return f"{len(blocks)} blocks wrapped"


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Frozen floating-point weights to the compute dtype (bf16 on a GPU); what trains stays fp32 for the
    optimizer. (Under DeepSpeed the engine casts the module itself.) Returns the parameters cast."""
    count = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and type(p) is nn.Parameter:
                module._parameters[name] = nn.Parameter(p.data.to(dtype), requires_grad=False)
                count += p.numel()
    return count


def apply_profile(model: nn.Module, profile: Profile, compute_dtype: torch.dtype, zero_stage: int,
                  encoder_path: str = "encoder") -> nn.Module:
    """`encoder_path`: where the backbone sits (TerraTorch's SMP models: smp_model.encoder)."""
    if profile.quantization != "none":
        # ZeRO-3 flattens parameters by dtype: 4-bit storage must then share the compute dtype (peft docs).
        storage = compute_dtype if zero_stage == 3 else torch.uint8
        # layers a streamed checkpoint filled are quantized already (on arrival); this takes the rest
        n = quantize_linears(_get(model, encoder_path), profile.quantization, compute_dtype, storage)
        if n:
            log.info("quantized %d backbone linear layers to %s", n, profile.quantization)
    if profile.lora is not None:
        add_lora(model, profile, encoder_path)
    if profile.grad_checkpointing:
        how = enable_grad_checkpointing(_get(model, encoder_path))
        log.info("gradient checkpointing on the backbone (%s)", how)
    if zero_stage == 0 and compute_dtype != torch.float32:
        n = cast_frozen(model, compute_dtype)
        if n:
            log.info("frozen weights held in %s: %.2fM parameters", str(compute_dtype).removeprefix("torch."), n / 1e6)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("profile %s: %.2fM of %.2fM parameters trainable", profile.name, trainable / 1e6, total / 1e6)
    return model
