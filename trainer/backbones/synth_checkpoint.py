"""Synthetic real-width, reduced-depth InternVL checkpoints, written tensor by tensor (never a whole model).

For measuring the loader at the width that matters: every tensor has the shape of the catalog entry's
real dimensions (InternVL2-40B: InternViT-6B layers 3200 wide, Yi-34B layers 7168 wide, the 12800→7168
projector), only the number of vision and LLM layers is chosen. Two layouts, the two the loader reads:

- native: what `InternVLForConditionalGeneration.save_pretrained` writes in transformers 5.x
  (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`)
  plus that class's config.json;
- remote: OpenGVLab's remote-code layout (`vision_model.*` with InternViT's fused `attn.qkv`, `mlp1.{0,1,3}`,
  `language_model.*` with the LLM's own Llama names) and its `internvl_chat` config.json.

Names and shapes come from the native class built on the meta device (no memory); values are generated
per tensor from (seed, name), in chunks, in bf16, and streamed into safetensors shards by a small writer
of the format itself (8-byte header length, JSON header, raw little-endian data), so the writer holds one
chunk at a time. `expected(name)` regenerates any written tensor for checks. The text embeddings and LM
head are written (the loader must skip them) at a reduced vocabulary by default: at Yi-34B's 64000 they
would be 0.92B of the file for nothing the backbone builds.
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.backbones import catalog

CHUNK = 1 << 22  # elements generated at once: 8 MB of bf16
STD = 0.02


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    parts: tuple[str, ...] = ()  # remote layout: the native tensors fused into this one, in order

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def config_for(backbone: str, vision_layers: int, llm_layers: int, vocab: int | None = 4096,
               width_divisor: int = 1):
    """The catalog's real dims with the chosen depths (and optionally a reduced vocab / width for CI)."""
    dims = catalog.thaw(catalog.get(backbone).dims)
    v, t = dims["vision_config"], dims["text_config"]
    v["num_hidden_layers"], t["num_hidden_layers"] = vision_layers, llm_layers
    if vocab:
        t["vocab_size"] = vocab
    if width_divisor > 1:  # same heads and layer structure, narrower heads: only for a cheaper CI test
        for c in (v, t):
            for k in ("hidden_size", "intermediate_size"):
                c[k] //= width_divisor
    return catalog.make_config(catalog.get(backbone).family, dims)


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF


def _is_norm_weight(name: str) -> bool:
    return bool(re.search(r"(norm[^.]*|layernorm_\w+|layer_norm|norm\d)\.weight$", name))


def _chunks(name: str, numel: int, seed: int):
    """The values of tensor `name`, flat, CHUNK elements at a time: N(0, 0.02) (norm weights 1 + that), bf16."""
    g = torch.Generator().manual_seed(_seed(seed, name))
    shift = 1.0 if _is_norm_weight(name) else 0.0
    for start in range(0, numel, CHUNK):
        yield (torch.randn(min(CHUNK, numel - start), generator=g) * STD + shift).to(torch.bfloat16)


def generate(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The whole tensor `name` (for checks; the writer streams `_chunks` instead)."""
    n = 1
    for s in shape:
        n *= s
    return torch.cat(list(_chunks(name, n, seed))).view(shape)


# --- names and shapes ---------------------------------------------------------------------------------
def native_specs(config) -> list[Spec]:
    """save_pretrained names (v4-style keys, as transformers 5.x writes them) and shapes, from a meta build."""
    import transformers

    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(config)
    specs = []
    for k, t in model.state_dict().items():
        k = re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", k)
        k = re.sub(r"^model\.language_model\.", "language_model.model.", k)
        k = re.sub(r"^lm_head\.", "language_model.lm_head.", k)
        specs.append(Spec(k, tuple(t.shape)))
    return specs


_TO_REMOTE = [
    (r"^vision_tower\.", "vision_model."), (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"\.attention\.projection_layer\.", ".attn.proj."), (r"\.attention\.(q_norm|k_norm)\.", r".attn.\1."),
    (r"\.lambda_1$", ".ls1"), (r"\.lambda_2$", ".ls2"), (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."), (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."), (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
]


def remote_specs(config) -> list[Spec]:
    """OpenGVLab's names: InternViT's q/k/v fused into `attn.qkv` (rows q, k, v); a Llama LLM keeps HF names."""
    specs, by_name = [], {s.name: s for s in native_specs(config)}
    for s in by_name.values():
        m = re.match(r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", s.name)
        if m:
            if m[2] == "q":
                parts = tuple(f"vision_tower.encoder.layer.{m[1]}.attention.{p}_proj.{m[3]}" for p in "qkv")
                rows = sum(by_name[p].shape[0] for p in parts)
                specs.append(Spec(f"vision_model.encoder.layers.{m[1]}.attn.qkv.{m[3]}", (rows, *s.shape[1:]), parts))
            continue
        name = s.name
        for pattern, repl in _TO_REMOTE:
            name = re.sub(pattern, repl, name)
        specs.append(Spec(name, s.shape))
    return specs


def remote_config_json(config) -> dict:
    v, t = config.vision_config, config.text_config
    return {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "downsample_ratio": 0.5,
            "template": "Hermes-2", "torch_dtype": "bfloat16",
            "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                              "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm,
                              "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps,
                              "image_size": v.image_size[0], "patch_size": v.patch_size[0]},
            "llm_config": {"architectures": ["LlamaForCausalLM"], "hidden_size": t.hidden_size,
                           "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                           "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                           "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps,
                           "rope_theta": t.rope_parameters["rope_theta"] if getattr(t, "rope_parameters", None)
                           else getattr(t, "rope_theta", 1e6)}}


# --- writing ------------------------------------------------------------------------------------------
def _remote_native_name(name: str, native: dict[str, Spec]) -> str:
    """Which native name a (non-fused) remote tensor was generated under."""
    for n in native:
        mapped = n
        for pattern, repl in _TO_REMOTE:
            mapped = re.sub(pattern, repl, mapped)
        if mapped == name:
            return n
    raise KeyError(name)


def write_shard(path: Path, items: list[tuple[Spec, str]], seed: int) -> int:
    """One safetensors file; `items` are (spec, name the values are generated under). Returns bytes written."""
    header, offset = {}, 0
    for spec, _ in items:
        size = spec.numel * 2
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec, source in items:
            # a fused remote tensor is its native parts one after the other (row blocks): both layouts of
            # the same (seed, depths) hold the same weights
            for part in spec.parts or (source,):
                for chunk in _chunks(part, spec.numel // max(1, len(spec.parts)), seed):
                    f.write(chunk.view(torch.int16).numpy().data)
    return 8 + len(raw) + offset


def write_checkpoint(out: Path, vision_layers: int, llm_layers: int, layout: str = "native", seed: int = 0,
                     backbone: str = "internvl2_40b", shard_bytes: int = 512 << 20, vocab: int | None = 4096,
                     width_divisor: int = 1) -> dict:
    """Write the checkpoint into `out` (created); returns {params, bytes, files, layout, ...}."""
    if layout not in ("native", "remote"):
        raise ValueError(f"layout {layout!r}: native or remote")
    config = config_for(backbone, vision_layers, llm_layers, vocab, width_divisor)
    native = native_specs(config)
    specs = native if layout == "native" else remote_specs(config)
    native_by_name = {s.name: s for s in native}
    sources = [s.name if layout == "native" or s.parts else _remote_native_name(s.name, native_by_name)
               for s in specs]
    shards, current, size = [], [], 0
    for spec, source in zip(specs, sources):
        if current and size + spec.numel * 2 > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((spec, source))
        size += spec.numel * 2
    shards.append(current)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, items in zip(names, shards):
        write_shard(out / fname, items, seed)
        total += sum(s.numel * 2 for s, _ in items)
        weight_map.update({s.name: fname for s, _ in items})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if layout == "native":
        config.architectures = ["InternVLForConditionalGeneration"]
        config.save_pretrained(str(out))
    else:
        (out / "config.json").write_text(json.dumps(remote_config_json(config), indent=1))
    params = sum(s.numel for s in specs)
    unused_specs = [s for s in specs if re.search(r"lm_head\.|embed_tokens\.", s.name)]
    unused = sum(s.numel for s in unused_specs)
    info = {"backbone": backbone, "layout": layout, "vision_layers": vision_layers, "llm_layers": llm_layers,
            "vocab": config.text_config.vocab_size, "width_divisor": width_divisor, "seed": seed,
            "params": params, "params_used": params - unused,
            "tensors": len(specs), "tensors_used": len(specs) - len(unused_specs), "bytes": total, "files": names}
    (out / "synthetic.json").write_text(json.dumps(info, indent=1))
    return info


def expected(native_name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The value the writer gave native tensor `native_name` (either layout: remote fuses these)."""
    return generate(native_name, shape, seed)
