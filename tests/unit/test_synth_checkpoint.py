"""The synthetic checkpoint writer: valid safetensors shards + index, both layouts hold the same weights."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from trainer.backbones import synth_checkpoint as sc

NARROW = 32  # InternVL2-40B's structure at 1/32 width: vision 100 (25 heads of 4), LLM 224 (56 heads of 4)


def _read(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for name, fname in index["weight_map"].items():
        with safe_open(str(path / fname), framework="pt") as f:
            out[name] = f.get_tensor(name)
    assert sum(t.numel() * 2 for t in out.values()) == index["metadata"]["total_size"]
    return out


def test_both_layouts_hold_the_same_bf16_weights(tmp_path):
    infos = {lay: sc.write_checkpoint(tmp_path / lay, 2, 1, lay, width_divisor=NARROW, shard_bytes=1 << 20)
             for lay in ("native", "remote")}
    native, remote = _read(tmp_path / "native"), _read(tmp_path / "remote")
    assert len(infos["native"]["files"]) > 1 and infos["native"]["params"] == infos["remote"]["params"]
    assert all(t.dtype == torch.bfloat16 for t in native.values())
    assert "language_model.lm_head.weight" in native and "language_model.model.embed_tokens.weight" in native
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["model_type"] == "internvl" and cfg["text_config"]["num_hidden_layers"] == 1
    assert cfg["vision_config"]["num_hidden_layers"] == 2 and cfg["text_config"]["vocab_size"] == 4096
    rcfg = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert rcfg["model_type"] == "internvl_chat" and rcfg["llm_config"]["architectures"] == ["LlamaForCausalLM"]

    qkv = remote["vision_model.encoder.layers.1.attn.qkv.weight"]
    parts = [native[f"vision_tower.encoder.layer.1.attention.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(qkv, torch.cat(parts))
    assert torch.equal(remote["mlp1.1.weight"], native["multi_modal_projector.linear_1.weight"])
    assert torch.equal(remote["vision_model.encoder.layers.0.ls1"], native["vision_tower.encoder.layer.0.lambda_1"])
    assert torch.equal(remote["language_model.model.layers.0.mlp.up_proj.weight"],
                       native["language_model.model.layers.0.mlp.up_proj.weight"])
    assert len(remote) == len(native) - 2 * 2  # k and v fused into q, per vision layer

    w = native["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w, sc.expected("language_model.model.layers.0.self_attn.q_proj.weight", tuple(w.shape)))
    assert 0.015 < w.float().std() < 0.025
    norm = native["language_model.model.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean() - 1) < 0.01
