"""Each memory profile really changes the model: trainable counts, 4-bit layers, checkpointing, exports."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from trainer.config import DEMO_CONFIG, load_experiment
from trainer.errors import ConfigError
from trainer.memory.profiles import PROFILES, check_combination, resolve_profile
from trainer.model.fitting import apply_profile, dequantized_weight, enable_grad_checkpointing
from trainer.model.models import build_model, model_output
from trainer.train.export import load_exported, save_safetensors

TINY = ["model.backbone_kwargs.img_size=32"]


def _exp(*extra):
    return load_experiment(DEMO_CONFIG, [*TINY, *extra])


def _build(profile: str, *extra):
    exp = _exp(f"memory.profile={profile}", *extra)
    torch.manual_seed(0)
    return exp, apply_profile(build_model(exp), resolve_profile(exp.memory), torch.float32, zero_stage=0)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _saved_tensors(model: nn.Module, x: torch.Tensor) -> int:
    n = 0

    def pack(t):
        nonlocal n
        n += 1
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_output(model(x)).sum()
    return n


@pytest.mark.parametrize("name", [n for n in PROFILES if n != "auto"])
def test_profile_trainable_parameters(name):
    exp, model = _build(name)
    p = PROFILES[name]
    enc_trainable = [(n, q) for n, q in model.encoder.named_parameters() if q.requires_grad]
    rest = _count(q for n, q in model.named_parameters() if not n.startswith("encoder."))
    assert rest > 0
    assert all(q.requires_grad for n, q in model.named_parameters() if not n.startswith("encoder."))
    if p.lora is None:
        assert _count(q for _, q in model.named_parameters() if q.requires_grad) == _count(model.parameters())
    else:
        assert enc_trainable and all("lora_" in n for n, _ in enc_trainable), enc_trainable[:3]
        # adapters on qkv/proj/fc1/fc2 of each of the 4 blocks of the tiny ViT, rank 16
        assert sum(1 for n, _ in enc_trainable if n.endswith("lora_A.default.weight")) == 16
        assert 0 < _count(q for _, q in enc_trainable) < 0.5 * _count(model.encoder.parameters())
    linears4 = [m for m in model.encoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if p.quantization == "nf4":
        plain = [n for n, m in model.encoder.named_modules() if type(m) is nn.Linear and "lora_" not in n]
        assert len(linears4) == 16 and not plain, plain
        assert linears4[0].weight.quant_type == "nf4" and linears4[0].weight.dtype == torch.uint8
    else:
        assert not linears4


def test_overrides_change_the_profile():
    exp = _exp("memory.profile=lora", "memory.lora.rank=4", "memory.grad_checkpointing=false",
               "memory.lora.target_modules=[attn.qkv]")
    p = resolve_profile(exp.memory)
    assert p.lora.rank == 4 and p.grad_checkpointing is False and p.lora.target_modules == ("attn.qkv",)
    model = apply_profile(build_model(exp), p, torch.float32, 0)
    a = [q for n, q in model.named_parameters() if n.endswith("lora_A.default.weight")]
    assert len(a) == 4 and a[0].shape[0] == 4


def test_unknown_lora_target_is_a_config_error():
    with pytest.raises(ConfigError, match="memory.lora.target_modules"):
        _build("lora", "memory.lora.target_modules=[nope_layer]")


def test_grad_checkpointing_saves_fewer_tensors():
    x = torch.randn(2, 6, 32, 32)
    exp = _exp("memory.profile=full")
    torch.manual_seed(0)
    plain = build_model(exp)
    torch.manual_seed(0)
    ckpt = build_model(exp)
    enable_grad_checkpointing(ckpt.encoder)
    n_plain, n_ckpt = _saved_tensors(plain, x), _saved_tensors(ckpt, x)
    assert n_ckpt < 0.7 * n_plain, (n_ckpt, n_plain)
    # same numbers, same keys: checkpointing changes memory, not the model
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    plain.eval(), ckpt.eval()
    assert_close(model_output(ckpt(x)), model_output(plain(x)))


def test_known_bad_combinations_are_refused():
    with pytest.raises(ConfigError, match="raises GPU memory"):
        check_combination(resolve_profile(_exp("memory.profile=qlora").memory), 3, {"param": "cpu"})
    with pytest.raises(ConfigError, match="without LoRA"):
        check_combination(resolve_profile(_exp("memory.profile=full", "memory.quantization=nf4").memory), 0, {})


def merged_model(trained: nn.Module) -> nn.Module:
    """A copy of `trained` with its 4-bit/8-bit layers dequantized (back to nn.Linear) and LoRA merged, in memory:
    what a merged export of a tiny model holds (`terrascale export --merge` streams a base checkpoint instead)."""
    import copy

    model = copy.deepcopy(trained).cpu()
    for name, m in list(model.named_modules()):
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            w = dequantized_weight(m).float()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            lin.weight.data.copy_(w)
            if m.bias is not None:
                lin.bias.data.copy_(m.bias.data.float())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    if hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()
    return model.float()


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merged_export_reproduces_trained_outputs(name, tmp_path):
    exp, model = _build(name, "memory.grad_checkpointing=false")
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    x, y = torch.randn(2, 6, 32, 32), torch.randint(0, 2, (2, 32, 32))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model_output(model(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora_b = [q for n, q in model.named_parameters() if "lora_B" in n]
    assert any(q.abs().sum() > 0 for q in lora_b), "LoRA B stayed zero: adapters did not train"
    model.eval()
    with torch.no_grad():  # an eval forward (validation): must not change the model (bitsandbytes' AVX512-bf16
        model(x)           # CPU kernel would repack 4-bit weights in place, absmax rounded to bf16)
    with torch.no_grad():
        want = model_output(model(x))
    (tmp_path / "export").mkdir()
    save_safetensors(merged_model(model).state_dict(), tmp_path / "export" / "model.merged.safetensors")
    restored = load_exported(exp, tmp_path / "export")
    assert not any("lora" in k for k in restored.state_dict())
    with torch.no_grad():
        got = model_output(restored(x))
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    model.encoder.save_pretrained(str(tmp_path / "adapter"))
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.3 * (tmp_path / "export" / "model.merged.safetensors").stat().st_size
