"""Registered backbones end to end on CPU with tiny random configs of the real architecture classes.

Each case writes a checkpoint (native `save_pretrained`, the original InternVL remote-code layout,
EarthMind's layout, Clay's Lightning keys, SatMAE/timm keys), builds a segmentation model through
TerraTorch's EncoderDecoderFactory by registry name, and checks: loaded weights equal the saved
ones, output shape, non-zero gradients on the input adapter and inside the backbone, and that
gradient checkpointing really stores fewer activations.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from trainer.backbones import catalog, register_all
from trainer.backbones.factory import build_backbone
from trainer.errors import ConfigError

NECKS = [{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "ReshapeTokensToImage"},
         {"name": "LearnedInterpolateToPyramidal"}]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_all()
    register_all()  # idempotent


def _native(name: str):
    torch.manual_seed(0)
    model = getattr(transformers, catalog.get(name).hf_classes[1])(catalog.tiny_config(name))
    if catalog.get(name).family == "gemma3":  # Gemma 3 zero-inits its projector; a trained one is not zero
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    return model


def _remote_internvl(native, internlm2: bool) -> tuple[dict, dict]:
    """The same weights in OpenGVLab's remote-code layout (and its config.json), written independently of loading.py."""
    cfg, out = native.config, {}
    for k, v in native.state_dict().items():
        k = k.removeprefix("model.")
        if k.startswith("vision_tower."):
            k = (k.replace("vision_tower.", "vision_model.").replace("encoder.layer.", "encoder.layers.")
                 .replace("embeddings.cls_token", "embeddings.class_embedding")
                 .replace("embeddings.patch_embeddings.projection", "embeddings.patch_embedding")
                 .replace("embeddings.position_embeddings", "embeddings.position_embedding")
                 .replace("attention.projection_layer", "attn.proj").replace("lambda_1", "ls1")
                 .replace("lambda_2", "ls2").replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
                 .replace("attention.q_norm", "attn.q_norm").replace("attention.k_norm", "attn.k_norm"))
            if ".attention.q_proj." in k:  # fuse q, k, v into InternViT's qkv
                base, kind = k.split(".attention.q_proj.")
                src = "model.vision_tower." + base.removeprefix("vision_model.").replace("layers.", "layer.")
                out[f"{base}.attn.qkv.{kind}"] = torch.cat(
                    [native.state_dict()[f"{src}.attention.{p}_proj.{kind}"] for p in "qkv"])
            if ".attention." not in k:
                out[k] = v
        elif k.startswith("multi_modal_projector."):
            for ours, theirs in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
                k = k.replace(f"multi_modal_projector.{ours}", f"mlp1.{theirs}")
            out[k] = v
        elif k == "lm_head.weight":
            out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = v
        elif not internlm2:
            out[k.replace("language_model.", "language_model.model.", 1)] = v
        else:  # InternLM2 names, q/k/v fused per KV head as [q × groups, k, v]
            k = k.replace("language_model.", "language_model.model.", 1).replace("embed_tokens", "tok_embeddings")
            k = (k.replace("self_attn.o_proj", "attention.wo").replace("mlp.gate_proj", "feed_forward.w1")
                 .replace("mlp.up_proj", "feed_forward.w3").replace("mlp.down_proj", "feed_forward.w2")
                 .replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm"))
            if "self_attn.q_proj" in k:
                t = cfg.text_config
                hd, kv = t.hidden_size // t.num_attention_heads, t.num_key_value_heads
                pre = k.split(".self_attn")[0].replace("language_model.model.", "model.language_model.")
                q, kk, vv = (native.state_dict()[f"{pre}.self_attn.{p}_proj.weight"] for p in "qkv")
                q = q.view(kv, -1, hd, q.shape[-1])
                fused = torch.cat([q, kk.view(kv, 1, hd, -1), vv.view(kv, 1, hd, -1)], dim=1)
                out[k.replace("self_attn.q_proj", "attention.wqkv")] = fused.reshape(-1, q.shape[-1])
            elif "self_attn" not in k:
                out[k] = v
    v, t = cfg.vision_config, cfg.text_config
    arch = "InternLM2ForCausalLM" if internlm2 else "Qwen2ForCausalLM"
    config = {"model_type": "internvl_chat", "downsample_ratio": 0.5, "template": "internvl2_5",
              "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                                "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                                "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm,
                                "norm_type": v.norm_type, "image_size": v.image_size[0], "patch_size": v.patch_size[0]},
              "llm_config": {"architectures": [arch], "hidden_size": t.hidden_size, "vocab_size": t.vocab_size,
                             "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                             "num_attention_heads": t.num_attention_heads,
                             "num_key_value_heads": t.num_key_value_heads}}
    return out, config


def _write(tmp_path, name: str, layout: str):
    """Save a tiny checkpoint; returns (directory, reference module whose weights the backbone must hold)."""
    entry = catalog.get(name)
    if entry.family == "clay":
        from trainer.backbones.geo import clay_encoder
        torch.manual_seed(0)
        enc = clay_encoder(catalog.tiny_config(name))
        state = {f"model.encoder.{k}": v for k, v in enc.state_dict().items()}
        state["model.decoder.embed.weight"] = torch.zeros(2, 2)  # MAE decoder, unused by the encoder
        save_file(state, str(tmp_path / "model.safetensors"))
        return tmp_path, {"encoder": enc}
    if entry.family == "satmae":
        from timm.models.vision_transformer import VisionTransformer
        d = catalog.tiny_config(name)
        torch.manual_seed(0)
        vit = VisionTransformer(img_size=d["img_size"], patch_size=d["patch_size"], embed_dim=d["embed_dim"],
                                depth=d["depth"], num_heads=d["num_heads"], num_classes=0)
        state = dict(vit.state_dict(), **{"decoder_embed.weight": torch.zeros(2, 2)})
        save_file(state, str(tmp_path / "model.safetensors"))
        return tmp_path, {"vit": vit}
    native = _native(name)
    if layout == "native":
        native.save_pretrained(tmp_path)
    else:
        internlm2 = entry.dims["text_config"]["model_type"] == "llama"  # InternLM2 is Llama-shaped in the catalog
        state, config = _remote_internvl(native, internlm2)
        if layout == "earthmind":  # EarthMind (Sa2VA) adds a SAM2 grounding decoder and a text→mask MLP
            config["model_type"] = "sa2va_chat"
            state.update({"grounding_encoder.sam2_model.image_encoder.trunk.weight": torch.zeros(3),
                          "text_hidden_fcs.0.weight": torch.zeros(4, 4), "local_query": torch.zeros(2, 4)})
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps(config))
    m = native.model
    if entry.family == "granite_hybrid":
        return tmp_path, {"language_model": m}
    vision = "visual" if entry.family == "qwen2_vl" else "vision_tower"
    refs = {vision: getattr(m, vision), "language_model": m.language_model}
    if hasattr(m, "multi_modal_projector"):
        refs["multi_modal_projector"] = m.multi_modal_projector
    return tmp_path, refs


def _saved_tensors(fn) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


CASES = [  # name, backbone kwargs, checkpoint layout
    ("internvl2_5_4b", {"mode": "vision"}, "native"),
    ("internvl2_5_4b", {"mode": "full"}, "native"),
    ("internvl2_5_8b", {"mode": "full"}, "remote"),  # InternLM2 fused wqkv
    ("internvl2_26b", {"mode": "vision", "adapter": "expand"}, "remote"),  # InternViT-6B flavour: rms + qk-norm
    ("earthmind_4b", {"mode": "full", "bands": ["VV", "VH", "B02", "B03", "B04", "B08"]}, "earthmind"),
    ("qwen2_vl_7b", {"mode": "vision"}, "native"),
    ("qwen2_vl_7b", {"mode": "full"}, "native"),
    ("gemma3_4b", {"mode": "vision", "adapter": "expand"}, "native"),
    ("gemma3_4b", {"mode": "full"}, "native"),
    ("granite_4_tiny", {"patch_size": 4}, "native"),
    ("clay_v1", {}, "native"),
    ("clay_v1_5", {}, "native"),
    ("satmae_vit_l", {}, "native"),
]


@pytest.mark.parametrize("name,kwargs,layout", CASES, ids=[f"{n}-{k.get('mode', 'encoder')}-{l}" for n, k, l in CASES])
def test_segmentation_through_terratorch(tmp_path, name, kwargs, layout):
    from terratorch.models import EncoderDecoderFactory

    path, refs = _write(tmp_path, name, layout)
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone=name, backbone_tiny=True, backbone_pretrained_path=str(path),
        **{f"backbone_{k}": v for k, v in kwargs.items()}, necks=NECKS, decoder="UNetDecoder",
        decoder_channels=[16, 8, 8, 4], num_classes=2)
    backbone = model.encoder

    # loaded weights equal the saved ones, module by module (independent of the key mapping)
    compared = 0
    for part, ref in refs.items():
        if part not in dict(backbone.named_children()):  # e.g. no language model in vision mode
            continue
        ours = dict(getattr(backbone, part).named_parameters())
        for key, tensor in ref.named_parameters():
            if key in ours and ours[key].shape == tensor.shape:
                assert torch.equal(ours[key], tensor), f"{part}.{key} differs from the checkpoint"
                compared += 1
    assert compared >= 10
    assert not backbone.load_report.unexpected
    if layout == "earthmind":
        assert any(k.startswith("grounding_encoder.") for k in backbone.load_report.skipped)

    torch.manual_seed(1)
    x = torch.randn(2, 6, 32, 32)
    model.train()
    saved_plain = _saved_tensors(lambda: model(x))
    backbone.gradient_checkpointing_enable()
    holder = {}
    saved_ckpt = _saved_tensors(lambda: holder.setdefault("out", model(x).output))
    assert saved_ckpt < saved_plain, "gradient checkpointing stored as many activations as without it"

    out = holder["out"]
    assert out.shape == (2, 2, 32, 32)
    out.square().mean().backward()
    if name.startswith("clay"):
        adapter = backbone.encoder.patch_embedding  # Clay's own per-band (wavelength) embedding
    elif name == "granite_4_tiny":
        adapter = backbone.patch_embed
    elif kwargs.get("adapter") == "expand":
        adapter = backbone._patch_conv()[0]
    else:
        adapter = backbone.input_adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    first_layer = next(iter(refs))
    grads = [p.grad for p in getattr(backbone, first_layer).parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_expand_keeps_rgb_kernels_and_inits_extra_bands_from_their_mean(tmp_path):
    path, refs = _write(tmp_path, "gemma3_4b", "native")
    rgb = refs["vision_tower"].embeddings.patch_embedding.weight.detach()
    model = build_backbone("gemma3_4b", pretrained_path=str(path), in_channels=5, adapter="expand",
                           rgb_indices=[2, 1, 0])
    w = model.vision_tower.embeddings.patch_embedding.weight
    assert w.shape[1] == 5
    scale = 3 / 5
    torch.testing.assert_close(w[:, 2], rgb[:, 0] * scale)  # input band 2 feeds R
    torch.testing.assert_close(w[:, 0], rgb[:, 2] * scale)
    torch.testing.assert_close(w[:, 4], rgb.mean(1) * scale)


def test_load_report_names_missing_and_unexpected_keys(tmp_path):
    path, _ = _write(tmp_path, "internvl2_5_4b", "native")
    state = load_file(str(path / "model.safetensors"))
    dropped = "vision_tower.encoder.layer.0.mlp.fc1.weight"
    del state[dropped]
    state["vision_tower.encoder.layer.0.mystery.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    model = build_backbone("internvl2_5_4b", pretrained_path=str(path), mode="vision")
    assert model.load_report.missing == [dropped]
    assert model.load_report.unexpected == ["vision_tower.encoder.layer.0.mystery.weight"]
    assert any(k.startswith("language_model.") for k in model.load_report.skipped)  # vision mode builds no LM
    assert "missing 1" in model.load_report.summary() and "unexpected 1" in model.load_report.summary()

    save_file({"something.else": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(ConfigError, match="no tensor"):
        build_backbone("internvl2_5_4b", pretrained_path=str(path), mode="vision")


def test_pickle_needs_opt_in_and_remote_code_is_not_run(tmp_path):
    path, _ = _write(tmp_path, "clay_v1", "native")
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save({"state_dict": state}, str(path / "clay.ckpt"))
    with pytest.raises(ConfigError, match="allow_pickle"):
        build_backbone("clay_v1", tiny=True, pretrained_path=str(path))
    assert build_backbone("clay_v1", tiny=True, pretrained_path=str(path), allow_pickle=True).load_report.loaded

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "mystery_vlm", "auto_map": {}}))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x" / "model.safetensors"))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        build_backbone("earthmind_4b", pretrained_path=str(tmp_path / "x"))


def test_unknown_kwarg_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match="out_indices"):
        build_backbone("qwen2_vl_7b", tiny=True, out_indice=[0])


def test_full_mode_drops_lm_head_and_text_embeddings():
    model = build_backbone("internvl2_5_4b", tiny=True, mode="full")
    names = [n for n, _ in model.named_parameters()]
    assert model.language_model.embed_tokens is None
    assert not any("lm_head" in n or "embed_tokens" in n for n in names)
    assert set(model.lora_target_modules) >= {"q_proj", "v_proj", "fc1"}


@pytest.mark.parametrize("name,kwargs", [("internvl2_5_4b", {"mode": "full"}), ("qwen2_vl_7b", {"mode": "full"}),
                                         ("gemma3_4b", {"mode": "full"}), ("granite_4_tiny", {}), ("clay_v1", {}),
                                         ("satmae_vit_l", {})])
def test_lora_target_modules_name_real_linear_layers(name, kwargs):
    from peft import LoraConfig, inject_adapter_in_model

    model = build_backbone(name, tiny=True, **kwargs)
    wrapped = inject_adapter_in_model(LoraConfig(r=2, target_modules=model.lora_target_modules), model)
    lora = [n for n, _ in wrapped.named_modules() if n.endswith("lora_A")]
    assert lora, f"{name}: no module matched {model.lora_target_modules}"
    if kwargs.get("mode") == "full":  # both the vision tower and the language model get adapters
        assert any(n.startswith("language_model.") for n in lora)
        assert any(n.startswith(("vision_tower.", "visual.")) for n in lora)


def test_internvl_pixel_shuffle_matches_transformers_reference():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    model = build_backbone("internvl2_5_4b", tiny=True, mode="full")
    grid = torch.randn(2, 8, 6, 32)
    reference = model.multi_modal_projector(InternVLModel.pixel_shuffle(None, grid, 0.5))
    torch.testing.assert_close(model._project(grid, torch.Size([2, 3, 32, 24])), reference)


def test_qwen2_vl_token_order_round_trips_to_raster():
    # through our patchify + patch embedding + un-merge, each token must be the conv of its own raster patch
    model = build_backbone("qwen2_vl_7b", tiny=True, mode="vision", adapter="rgb")
    px = torch.randn(2, 3, 16, 24)
    p = model.config.vision_config.patch_size
    tokens = model.visual.patch_embed(model._patchify(px))
    ours = model._to_raster(tokens, 2, 16 // p, 24 // p)
    weight = model.visual.patch_embed.proj.weight.sum(2)  # the temporal copies see the same image
    raster = torch.nn.functional.conv2d(px, weight, stride=p).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, raster, atol=1e-5, rtol=1e-5)
