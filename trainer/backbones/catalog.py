"""Real published dimensions of every backbone terrascale knows, buildable on `torch.device("meta")`.

The memory planner reads this module on its fast path, so it imports only torch and transformers'
config/model classes — never TerraTorch or Accelerate (those cost 11–17 s); TerraTorch is imported
lazily inside the geospatial counting function alone. Every number below cites where it comes from;
`tests/unit/test_catalog.py` checks each meta-built count against `published_params` within 1 %.

Two traps this module exists to avoid (both measured on this machine, see DESIGN.md):
- `accelerate.init_empty_weights()` unties tied weights and over-counts: build under
  `with torch.device("meta"):` instead.
- InternVL's top-level `tie_word_embeddings` defaults to True and Qwen2-VL's text defaults are the
  72B dims: every entry states both explicitly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from trainer.errors import ConfigError

VLM_FAMILIES = ("internvl", "qwen2_vl", "gemma3")
VISION, FULL, ENCODER = "vision", "full", "encoder"


@dataclass(frozen=True)
class Entry:
    name: str                       # catalog key == registered backbone name (ours or TerraTorch's)
    family: str                     # internvl|qwen2_vl|gemma3|granite_hybrid|prithvi|terramind|clay|satmae
    hf_classes: tuple[str, ...]     # native classes: (config class, full model class)
    dims: Mapping[str, Any]         # kwargs of the native config (or of the encoder for geo models)
    published_params: float         # total the count must match within 1 %
    params_source: str              # where `published_params` comes from
    modes: tuple[str, ...]
    hub_id: str | None = None       # default checkpoint for `pretrained: true` (resolved offline from the HF cache)


def _freeze(d: dict) -> Mapping[str, Any]:
    return MappingProxyType(copy.deepcopy(d))


# --- InternVL -------------------------------------------------------------------------------------
# InternViT-300M-448px-V2_5: OpenGVLab/InternVL2_5-{4B,8B} config.json `vision_config`
# (hidden 1024, intermediate 4096, 24 layers, 16 heads, patch 14, image 448, qkv_bias true, layer_norm,
# no qk-norm), seen in public copies of those configs via the code-search corpus.
_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
                       image_size=448, patch_size=14)
# InternViT-6B-448px-V1-5 (used by InternVL2-26B/40B): hidden 3200, intermediate 12800, 45 layers (the
# V1-5 release drops the last 3 of 48), 25 heads, qkv_bias false, qk_normalization true, rms_norm.
_INTERNVIT_6B = dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
                     attention_bias=False, use_qk_norm=True, norm_type="rms_norm", layer_norm_eps=1e-6,
                     image_size=448, patch_size=14)
# InternVL2_5-4B `llm_config`: Qwen2.5-3B-Instruct, hidden 2048, intermediate 11008, 36 layers, 16 heads,
# 2 KV heads, vocab 151674 (InternVL's extended tokenizer), tie_word_embeddings false.
_QWEN25_3B = dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, vocab_size=151674, rms_norm_eps=1e-6,
                  rope_theta=1e6)
# InternVL2_5-8B `llm_config`: internlm2_5-7b-chat, hidden 4096, intermediate 14336, 32 layers, 32 heads,
# 8 KV heads, vocab 92553, untied. InternLM2 is Llama-shaped (fused wqkv split by `loading.py`), which
# is how transformers' own InternVL conversion maps it; here it is a LlamaConfig.
_INTERNLM25_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=92553, rms_norm_eps=1e-5,
                      rope_theta=1e6)
# InternVL2-26B `llm_config`: internlm2-chat-20b, hidden 6144, intermediate 16384, 48 layers, 48 heads, 8 KV.
_INTERNLM2_20B = dict(model_type="llama", hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                      num_attention_heads=48, num_key_value_heads=8, vocab_size=92553, rms_norm_eps=1e-5,
                      rope_theta=1e6)
# InternVL2-40B `llm_config`: Nous-Hermes-2-Yi-34B (Llama architecture), hidden 7168, intermediate 20480,
# 60 layers, 56 heads, 8 KV heads, vocab 64000, rope_theta 5e6.
_YI_34B = dict(model_type="llama", hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
               num_attention_heads=56, num_key_value_heads=8, vocab_size=64000, rms_norm_eps=1e-5, rope_theta=5e6)


def _internvl(vision: dict, text: dict) -> dict:
    # downsample_ratio 0.5 (pixel shuffle 2×2) and the 2-layer MLP projector are common to all InternVL2/2.5.
    return dict(vision_config=vision, text_config=text, downsample_ratio=0.5, tie_word_embeddings=False)


_INTERNVL_CLASSES = ("InternVLConfig", "InternVLForConditionalGeneration")
_E = Entry
_ENTRIES: dict[str, Entry] = {}


def _add(entry: Entry) -> None:
    _ENTRIES[entry.name] = entry


_add(_E("internvl2_5_4b", "internvl", _INTERNVL_CLASSES, _freeze(_internvl(_INTERNVIT_300M, _QWEN25_3B)),
        3.71e9, "OpenGVLab/InternVL2_5-4B model card: 3.71B", (VISION, FULL), "OpenGVLab/InternVL2_5-4B"))
_add(_E("internvl2_5_8b", "internvl", _INTERNVL_CLASSES, _freeze(_internvl(_INTERNVIT_300M, _INTERNLM25_7B)),
        8.08e9, "OpenGVLab/InternVL2_5-8B model card: 8.08B", (VISION, FULL), "OpenGVLab/InternVL2_5-8B"))
_add(_E("internvl2_26b", "internvl", _INTERNVL_CLASSES, _freeze(_internvl(_INTERNVIT_6B, _INTERNLM2_20B)),
        25.5e9, "OpenGVLab/InternVL2-26B model card: 25.5B", (VISION, FULL), "OpenGVLab/InternVL2-26B"))
_add(_E("internvl2_40b", "internvl", _INTERNVL_CLASSES, _freeze(_internvl(_INTERNVIT_6B, _YI_34B)),
        40.07e9, "OpenGVLab/InternVL2-40B model card: 40.07B", (VISION, FULL), "OpenGVLab/InternVL2-40B"))
# EarthMind-4B (shuyansy/EarthMind, configs/earthmind_4b_sft.py: `path = 'pretrained/InternVL2_5-4B'`) is
# InternVL2.5-4B plus a SAM2 grounding decoder and `text_hidden_fcs`; neither is used for feature
# extraction, so the catalog counts the InternVL part the backbone builds (loading reports the rest).
_add(_E("earthmind_4b", "internvl", _INTERNVL_CLASSES, _freeze(_internvl(_INTERNVIT_300M, _QWEN25_3B)),
        3.71e9, "InternVL2.5-4B part of EarthMind-4B (its base model; SAM2 decoder excluded)", (VISION, FULL)))

# --- Qwen2-VL-7B ----------------------------------------------------------------------------------
# Qwen/Qwen2-VL-7B-Instruct config.json: vision depth 32, embed_dim 1280, merger out 3584, 16 heads,
# mlp_ratio 4, patch 14, spatial_merge 2, temporal_patch 2; text hidden 3584, intermediate 18944,
# 28 layers, 28 heads, 4 KV heads, vocab 152064, rope_theta 1e6, mrope_section [16, 24, 24], untied.
# Every text dim is explicit: Qwen2VLTextConfig's defaults are the 72B model's.
_add(_E("qwen2_vl_7b", "qwen2_vl", ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"), _freeze(dict(
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_window_layers=28,
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
    tie_word_embeddings=False)), 8.29e9, "Qwen/Qwen2-VL-7B-Instruct model card: 8.29B", (VISION, FULL),
    "Qwen/Qwen2-VL-7B-Instruct"))

# --- Gemma 3 --------------------------------------------------------------------------------------
# SigLIP-So400m vision tower shared by every Gemma 3 VLM (google/gemma-3-*-it config.json vision_config):
# hidden 1152, intermediate 4304, 27 layers, 16 heads, patch 14, image 896, no pooling head.
_SIGLIP_896 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16, patch_size=14, image_size=896, vision_use_head=False, layer_norm_eps=1e-6)
_GEMMA3 = ("Gemma3Config", "Gemma3ForConditionalGeneration")
# google/gemma-3-4b-it text_config: hidden 2560, intermediate 10240, 34 layers, 8 heads, 4 KV, head_dim 256,
# vocab 262208, sliding window 1024, tied embeddings; 256 image tokens per image.
_add(_E("gemma3_4b", "gemma3", _GEMMA3, _freeze(dict(
    vision_config=_SIGLIP_896,
    text_config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                     query_pre_attn_scalar=256),
    mm_tokens_per_image=256, tie_word_embeddings=True)), 4.30e9, "google/gemma-3-4b-it model card: 4.30B",
    (VISION, FULL), "google/gemma-3-4b-it"))
# google/gemma-3-27b-it text_config: hidden 5376, intermediate 21504, 62 layers, 32 heads, 16 KV, head_dim 128.
_add(_E("gemma3_27b", "gemma3", _GEMMA3, _freeze(dict(
    vision_config=_SIGLIP_896,
    text_config=dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                     num_key_value_heads=16, head_dim=128, vocab_size=262208, sliding_window=1024,
                     query_pre_attn_scalar=168),
    mm_tokens_per_image=256, tie_word_embeddings=True)), 27.43e9, "google/gemma-3-27b-it model card: 27.43B",
    (VISION, FULL), "google/gemma-3-27b-it"))

# --- Granite 4.0 Tiny (hybrid Mamba2 / attention, MoE) ---------------------------------------------
# ibm-granite/granite-4.0-h-tiny config.json (public copy via the code-search corpus): hidden 1536,
# 40 layers of which 4 attention (indices 5, 15, 25, 35), 12 heads, 4 KV, 64 experts × 512, top-6,
# shared expert 1024, vocab 100352, tied; mamba 48 heads × 64, d_state 128, 1 group, conv 4, expand 2.
_GRANITE_LAYERS = (["mamba"] * 5 + ["attention"] + ["mamba"] * 9 + ["attention"] + ["mamba"] * 9
                   + ["attention"] + ["mamba"] * 9 + ["attention"] + ["mamba"] * 4)
_add(_E("granite_4_tiny", "granite_hybrid", ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"), _freeze(dict(
    hidden_size=1536, num_hidden_layers=40, num_attention_heads=12, num_key_value_heads=4, intermediate_size=512,
    shared_intermediate_size=1024, num_local_experts=64, num_experts_per_tok=6, vocab_size=100352,
    tie_word_embeddings=True, mamba_d_state=128, mamba_n_groups=1, mamba_n_heads=48, mamba_d_head=64,
    mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=256, layer_types=_GRANITE_LAYERS,
    position_embedding_type="nope")), 6.94e9,
    "ibm-granite/granite-4.0-h-tiny: '7B' on the card, ≈6.9B total in its safetensors metadata", (ENCODER,),
    "ibm-granite/granite-4.0-h-tiny"))

# --- Geospatial encoders (TerraTorch) --------------------------------------------------------------
# Their names ("100M", "300M") are rounded and count MAE decoders; the reference here is the encoder as
# TerraTorch 1.2.11 builds it with pretrained=False (measured on this machine), checked in tests against
# the same build, so a dims typo fails.
_TT = "TerraTorch 1.2.11 backbone, pretrained=False, encoder only (measured)"
for _name, _fam, _dims, _n in [
    ("prithvi_eo_v1_100", "prithvi", dict(embed_dim=768, depth=12, num_heads=12, patch_size=16), 86.237184e6),
    ("prithvi_eo_v2_300", "prithvi", dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16), 303.886336e6),
    ("prithvi_eo_v2_600", "prithvi", dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14), 631.18848e6),
    ("terramind_v1_tiny", "terramind", dict(embed_dim=192, depth=12, num_heads=3, patch_size=16), 5.4816e6),
    ("terramind_v1_small", "terramind", dict(embed_dim=384, depth=12, num_heads=6, patch_size=16), 21.580032e6),
    ("terramind_v1_base", "terramind", dict(embed_dim=768, depth=12, num_heads=12, patch_size=16), 85.544448e6),
    ("terramind_v1_large", "terramind", dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16), 302.778368e6),
]:
    _add(_E(_name, _fam, (), _freeze(_dims), _n, _TT, (ENCODER,)))
# Clay v1 base: TerraTorch clay_v1/embedder.py builds EmbeddingEncoder(dim 768, depth 12, heads 12,
# dim_head 64, mlp_ratio 4, patch 8). Clay v1.5: clay_v15/model.py `clay_mae_large` encoder (1024/24/16,
# dim_head 64, mlp_ratio 4, patch 8). Both have a wavelength-conditioned DynamicEmbedding.
_add(_E("clay_v1", "clay", (), _freeze(dict(dim=768, depth=12, heads=12, dim_head=64, mlp_ratio=4.0, patch_size=8,
                                             version="v1")), 92.102144e6, _TT + " (EmbeddingEncoder)", (ENCODER,)))
_add(_E("clay_v1_5", "clay", (), _freeze(dict(dim=1024, depth=24, heads=16, dim_head=64, mlp_ratio=4.0, patch_size=8,
                                               version="v1.5")), 311.442944e6, _TT + " (clay_v15 Encoder)", (ENCODER,)))
# SatMAE ViT-L (Cong et al. 2022, models_vit.vit_large_patch16): timm ViT-L/16, 1024/24/16, patch 16;
# 303.3M is timm's ViT-L/16 count (the paper's "ViT-Large ~304M").
_add(_E("satmae_vit_l", "satmae", ("timm.VisionTransformer",), _freeze(dict(
    embed_dim=1024, depth=24, num_heads=16, patch_size=16, img_size=224, mlp_ratio=4.0)),
    303.301632e6, "timm VisionTransformer ViT-L/16, num_classes=0", (ENCODER,)))


def names() -> list[str]:
    return list(_ENTRIES)


def get(name: str) -> Entry:
    if name not in _ENTRIES:
        raise ConfigError(f"model.backbone: unknown catalog entry {name!r}; known: {', '.join(_ENTRIES)}")
    return _ENTRIES[name]


# --- native configs ---------------------------------------------------------------------------------
def thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def make_config(family: str, kwargs: dict):
    import transformers as tf

    kwargs = copy.deepcopy(kwargs)
    if family == "internvl":
        text = kwargs.pop("text_config")
        theta = text.pop("rope_theta", None)
        if theta is not None:
            text["rope_parameters"] = dict(rope_type="default", rope_theta=theta)
        text_cfg = tf.AutoConfig.for_model(text.pop("model_type"), **text)
        return tf.InternVLConfig(text_config=text_cfg, **kwargs)
    if family == "qwen2_vl":
        return tf.Qwen2VLConfig(**kwargs)
    if family == "gemma3":
        return tf.Gemma3Config(**kwargs)
    if family == "granite_hybrid":
        return tf.GraniteMoeHybridConfig(**kwargs)
    raise ConfigError(f"model.backbone: family {family!r} has no transformers config")


def hf_config(name: str):
    """The native transformers config with the real dimensions of `name`."""
    entry = get(name)
    return make_config(entry.family, thaw(entry.dims))


# Tiny random configs of the same architecture class (CPU tests and demos): same flavour switches as
# the real entry (norm type, qk-norm, text model type, layer pattern), dims shrunk so a forward +
# backward on a 32×32 tile takes milliseconds. Patch 4 divides 32 and leaves an even 8×8 grid.
def _tiny_kwargs(entry: Entry) -> dict:
    d = thaw(entry.dims)
    if entry.family == "internvl":
        v = d["vision_config"]
        d["vision_config"] = dict(v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=32, patch_size=4)
        t = d["text_config"]
        d["text_config"] = dict(model_type=t["model_type"], hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=128)
    elif entry.family == "qwen2_vl":
        d["vision_config"] = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        d["text_config"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=128, max_window_layers=2,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
    elif entry.family == "gemma3":
        d["vision_config"] = dict(d["vision_config"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, patch_size=4, image_size=32)
        d["text_config"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, vocab_size=128, sliding_window=8,
                                query_pre_attn_scalar=16)
        d["mm_tokens_per_image"] = 16  # 8×8 patches pooled 2×2, as 64×64 → 16×16 in the real model
    elif entry.family == "granite_hybrid":
        d.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=16, shared_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                 vocab_size=128, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_chunk_size=16,
                 layer_types=["mamba", "attention"])
    elif entry.family in ("clay", "satmae", "prithvi", "terramind"):
        key = "dim" if entry.family == "clay" else "embed_dim"
        d.update({key: 32, "depth": 2})
        d.update({"heads": 2, "dim_head": 16} if entry.family == "clay" else {"num_heads": 2})
        d["patch_size"] = 4 if entry.family in ("clay", "satmae") else d["patch_size"]
        if entry.family == "satmae":
            d["img_size"] = 32
    return d


def tiny_config(name: str):
    """Tiny random config of `name`'s architecture class (a transformers config, or a dict for geo encoders)."""
    entry = get(name)
    kwargs = _tiny_kwargs(entry)
    if entry.family in VLM_FAMILIES or entry.family == "granite_hybrid":
        return make_config(entry.family, kwargs)
    return kwargs


# --- assembling the parts a backbone keeps ----------------------------------------------------------
def build_parts(config, family: str, mode: str, keep_text_embeddings: bool = False) -> nn.ModuleDict:
    """The native submodules a feature extractor keeps, named as in the native model's `model.*`.

    vision: the vision tower only. full: vision tower, projector and the language model's decoder
    stack; its token embedding table is dropped (image tokens arrive as inputs_embeds) unless
    `keep_text_embeddings` (used only while loading, so checkpoint keys can be matched and reported).
    encoder (text LLM): the decoder stack without the embedding table. No LM head in any mode.
    """
    from trainer.backbones.stream import hf_build_context

    # While a checkpoint is streamed in, the parts are built without weights (or ZeRO-3-partitioned).
    with hf_build_context():
        return _parts(config, family, mode, keep_text_embeddings)


def _parts(config, family: str, mode: str, keep_text_embeddings: bool) -> nn.ModuleDict:
    from transformers import AutoModel

    kw: dict = {}
    parts = nn.ModuleDict()
    if family == "granite_hybrid":
        parts["language_model"] = AutoModel.from_config(config, **kw)
    else:
        if family == "qwen2_vl":
            from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
            parts["visual"] = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config, **kw)
            if mode == VISION:
                parts["visual"].merger = None  # the merger is Qwen2-VL's projector
        else:
            parts["vision_tower"] = AutoModel.from_config(config.vision_config, **kw)
            if mode == FULL:
                parts["multi_modal_projector"] = _projector(config, family)
        if mode == FULL:
            parts["language_model"] = AutoModel.from_config(_text_config(config.text_config, keep_text_embeddings),
                                                            **kw)
    if "language_model" in parts and not keep_text_embeddings:
        parts["language_model"].embed_tokens = None
    return parts


def _text_config(text, keep_text_embeddings: bool):
    """The LM's config, with a one-row token table when the table is dropped anyway: it is never allocated
    (under ZeRO-3 it would be, and partitioned, before being dropped: 0.5B parameters at 40B size)."""
    if keep_text_embeddings:
        return text
    import copy

    small = copy.copy(text)
    small.vocab_size, small.pad_token_id = 1, None
    return small


def _projector(config, family: str) -> nn.Module:
    if family == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector
        return InternVLMultiModalProjector(config)
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    return Gemma3MultiModalProjector(config)


def _count(module: nn.Module | None) -> int:
    # parameters() de-duplicates shared tensors, so tied embeddings count once.
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _native_meta(name: str) -> nn.Module:
    import transformers as tf

    entry = get(name)
    with torch.device("meta"):
        return getattr(tf, entry.hf_classes[1])(hf_config(name))


class MetaButCpuLinspace(torch.overrides.TorchFunctionMode):
    """TerraMind's constructor calls `torch.linspace(...).item()` for drop-path rates, which meta tensors
    refuse; run that one scalar helper on CPU so the rest of the model still builds on meta in ms."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _geo_meta(entry: Entry) -> nn.Module:
    dims = dict(entry.dims)
    if entry.family == "satmae":
        from timm.models.vision_transformer import VisionTransformer
        with torch.device("meta"):
            return VisionTransformer(img_size=dims["img_size"], patch_size=dims["patch_size"],
                                     embed_dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
                                     mlp_ratio=dims["mlp_ratio"], num_classes=0)
    if entry.family == "clay":
        from trainer.backbones.geo import clay_encoder  # imports TerraTorch's Clay modules lazily
        with torch.device("meta"):
            return clay_encoder(dims)
    from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY  # lazy: 11–17 s import
    with torch.device("meta"), MetaButCpuLinspace():
        return TERRATORCH_BACKBONE_REGISTRY.build(entry.name, pretrained=False)


def build_meta(name: str, mode: str) -> nn.Module:
    """`name` at real size on the meta device, as the backbone would hold it in `mode`."""
    entry = get(name)
    if mode not in entry.modes:
        raise ConfigError(f"model.backbone_kwargs.mode: {name} supports {list(entry.modes)}, not {mode!r}")
    if entry.family not in VLM_FAMILIES and entry.family != "granite_hybrid":
        return _geo_meta(entry)
    with torch.device("meta"):
        return build_parts(hf_config(name), entry.family, mode)


def param_counts(name: str) -> dict[str, int]:
    """Parameter counts of the native model and of what each mode keeps/drops.

    Keys: total (native model, what `published_params` describes), vision_tower, projector,
    language_model (decoder stack incl. its embeddings), text_embeddings, lm_head (0 when tied to the
    embeddings), dropped_in_full (what full/encoder mode never builds), full, vision, encoder.
    """
    entry = get(name)
    if entry.family not in VLM_FAMILIES and entry.family != "granite_hybrid":
        n = _count(_geo_meta(entry))
        return dict(total=n, encoder=n, dropped_in_full=0)
    native = _native_meta(name)
    model = native.model
    emb = native.get_input_embeddings().weight
    head = native.get_output_embeddings().weight
    tied = head is emb
    counts = dict(total=_count(native), text_embeddings=emb.numel(), lm_head=0 if tied else head.numel())
    counts["dropped_in_full"] = counts["text_embeddings"] + counts["lm_head"]
    if entry.family == "granite_hybrid":
        counts["language_model"] = _count(model)
        counts["encoder"] = counts["total"] - counts["dropped_in_full"]
        return counts
    if entry.family == "qwen2_vl":
        counts["projector"] = _count(model.visual.merger)
        counts["vision_tower"] = _count(model.visual) - counts["projector"]
    else:
        counts["projector"] = _count(model.multi_modal_projector)
        counts["vision_tower"] = _count(model.vision_tower)
    counts["language_model"] = _count(model.language_model)
    counts["vision"] = counts["vision_tower"]
    counts["full"] = counts["total"] - counts["dropped_in_full"]
    return counts
