"""Loading real checkpoints into our backbones: find the files, read the config, map keys, report.

Sources: a local directory, or a hub id resolved through the local Hugging Face cache (this launcher
never needs the network at train time; a missing download is a ConfigError naming the kwarg).
Layouts: native transformers (both the v4-style keys `save_pretrained` writes and v5's in-memory
`model.*` keys), OpenGVLab's original remote-code InternVL (`vision_model.*`, `mlp1.*`,
`language_model.*`, InternLM2's fused `wqkv`), EarthMind's converted checkpoint (the same plus a SAM2
`grounding_encoder.*` we do not use) and, for Clay/SatMAE, their Lightning/MAE state dicts.
Remote code is never executed: configs are read as JSON. Pickle files (.bin/.pth/.ckpt) are read
only with `allow_pickle: true`, because unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def resolve_path(pretrained_path: str) -> Path:
    """A local directory/file, or a hub id found in the local cache (offline)."""
    path = Path(pretrained_path).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained_path, allow_patterns=["*.json", "*.safetensors"]))
    except (OSError, ValueError) as e:  # hub errors derive from these (not found, offline, bad id)
        raise ConfigError(f"model.backbone_kwargs.pretrained_path: {pretrained_path!r} is neither a local path nor "
                          f"a hub id available offline ({type(e).__name__}); download it on a machine with "
                          "network access and point pretrained_path at the directory") from e


def weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in SAFE_SUFFIXES)
        if not files:
            files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files:
        raise ConfigError(f"model.backbone_kwargs.pretrained_path: no .safetensors (or pickle) weights in {path}")
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled and not allow_pickle:
        raise ConfigError(f"model.backbone_kwargs.allow_pickle: {pickled} are pickle files, which can run code when "
                          "read; convert them to safetensors or set allow_pickle: true if you trust the source")
    return files


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The whole checkpoint in memory: only for pickle files (and transformers' conversions), which cannot be
    streamed; safetensors go through `trainer.backbones.stream`."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path, allow_pickle):
        if f.suffix in SAFE_SUFFIXES:
            part = load_file(str(f))
        else:
            # weights_only still refuses arbitrary classes; allow_pickle is the user's explicit opt-in.
            part = torch.load(str(f), map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "module"):
                if isinstance(part, dict) and key in part and isinstance(part[key], dict):
                    part = part[key]
        state.update(part)
    return state


def read_config_json(path: Path) -> dict | None:
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else None


# --- key layouts -------------------------------------------------------------------------------------
Mapped = dict[str, torch.Tensor]


def _native_vlm(sd: Mapped, family: str) -> Mapped:
    """v4-style (`save_pretrained`) and v5 in-memory keys of the native classes → our part names."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^model\.(vision_tower|visual|multi_modal_projector|language_model)\.", r"\1.", k)
        k = re.sub(r"^language_model\.model\.", "language_model.", k)
        k = re.sub(r"^language_model\.lm_head\.", "lm_head.", k)
        if family in ("qwen2_vl", "granite_hybrid"):
            k = re.sub(r"^model\.", "language_model.", k)  # their v4 layout keeps the LM at `model.*`
        out[k] = v
    return out


_VIT_RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.",
     r"vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"vision_tower.encoder.layer.\1.attention.\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
    # Qwen2 / Llama LLMs keep HF names under `language_model.model.*`.
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    # InternLM2 names (the fused wqkv is split below).
    (r"^language_model\.tok_embeddings\.", "language_model.embed_tokens."),
    (r"^language_model\.output\.", "lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]


def _internvl_remote(sd: Mapped, config) -> Mapped:
    """OpenGVLab remote-code InternVL (and EarthMind's converted) keys → native InternVL part names."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    kv, groups = text.num_key_value_heads, text.num_attention_heads // text.num_key_value_heads
    out = {}
    for k, v in sd.items():
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", k)
        if m:  # InternViT fuses q, k, v along the output dim in that order
            base = f"vision_tower.encoder.layer.{m[1]}.attention"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}.{name}.{m[2]}"] = chunk.contiguous()
            continue
        for pattern, repl in _VIT_RENAMES:
            k = re.sub(pattern, repl, k)
        m = re.match(r"^(language_model\.layers\.\d+)\.attention\.wqkv\.weight$", k)
        if m:  # InternLM2: rows grouped per KV head as [q × groups, k, v], each head_dim tall
            w = v.view(kv, groups + 2, head_dim, v.shape[-1])
            out[f"{m[1]}.self_attn.q_proj.weight"] = w[:, :groups].reshape(-1, v.shape[-1]).contiguous()
            out[f"{m[1]}.self_attn.k_proj.weight"] = w[:, -2].reshape(-1, v.shape[-1]).contiguous()
            out[f"{m[1]}.self_attn.v_proj.weight"] = w[:, -1].reshape(-1, v.shape[-1]).contiguous()
            continue
        out[k] = v
    return out


def checkpoint_keys(path: Path, allow_pickle: bool = False) -> list[str]:
    """Tensor names without reading the tensors (safetensors headers only)."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in weight_files(path, allow_pickle):
        if f.suffix not in SAFE_SUFFIXES:
            return list(read_state_dict(path, allow_pickle))
        with safe_open(str(f), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def load_native(class_name: str, root: Path, config, family: str,
                dtype: torch.dtype = torch.float32) -> tuple[Mapped, list[str], list[str]]:
    """A native-format directory through the native class's `from_pretrained`, so transformers' own
    checkpoint conversions apply (e.g. Granite's legacy `input_linear` → fused `experts.gate_up_proj`).
    Costs one transient copy of the whole model in memory; returns our-named tensors and the
    (our-named) keys the checkpoint lacked or had in excess."""
    import transformers

    native, info = getattr(transformers, class_name).from_pretrained(
        str(root if root.is_dir() else root.parent), config=config, dtype=dtype, output_loading_info=True)
    mapped = _native_vlm(native.state_dict(), family)
    provided = set(mapped) - set(_native_vlm(dict.fromkeys(info["missing_keys"]), family))
    unexpected = list(_native_vlm(dict.fromkeys(info["unexpected_keys"]), family))
    return {k: v for k, v in mapped.items() if k in provided}, unexpected, list(info["mismatched_keys"])


def detect_layout(sd) -> str:
    keys = list(sd)
    if any(k.startswith("vision_model.") for k in keys) and any(k.startswith("mlp1.") for k in keys):
        return "earthmind" if any(k.startswith("grounding_encoder.") for k in keys) else "internvl_remote"
    return "native"


def map_vlm_keys(sd: Mapped, family: str, layout: str, config) -> Mapped:
    if layout == "auto":
        layout = detect_layout(sd)
    if layout in ("internvl_remote", "earthmind"):
        if family != "internvl":
            raise ConfigError(f"model.backbone_kwargs.checkpoint_layout: {layout!r} is an InternVL layout, "
                              f"the backbone is {family}")
        return _internvl_remote(sd, config)
    if layout != "native":
        raise ConfigError(f"model.backbone_kwargs.checkpoint_layout: unknown {layout!r}; "
                          "use auto, native, internvl_remote or earthmind")
    return _native_vlm(sd, family)


# Parts of known checkpoints that feature extraction never uses: skipped silently but counted.
KNOWN_UNUSED = (r"^grounding_encoder\.", r"^text_hidden_fcs\.", r"^local_query$",  # EarthMind / Sa2VA SAM2 head
                r"^lm_head\.", r"\.embed_tokens\.", r"\.rotary_emb\.")


# --- applying -----------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)     # model tensors the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors nothing maps to
    skipped: list[str] = field(default_factory=list)     # known-unused or dropped by the mode
    stats: Any = None  # trainer.backbones.stream.StreamStats: seconds per phase, bytes and tensors read

    def as_json(self) -> dict:
        """What `<job>/load.json` records (counts, not key lists)."""
        st = self.stats
        return {"source": self.source, "loaded": len(self.loaded), "missing": len(self.missing),
                "unexpected": len(self.unexpected), "skipped": len(self.skipped),
                "seconds": {k: round(v, 3) for k, v in (st.seconds if st else {}).items()},
                "bytes_read": st.bytes_read if st else 0, "tensors": st.tensors if st else 0,
                "params": st.params if st else 0}

    def summary(self) -> str:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", … (+{len(keys) - 5})" if len(keys) > 5 else "")
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}; skipped {len(self.skipped)} "
                 f"(unused for feature extraction)"]
        if self.missing:
            lines.append(f"missing {len(self.missing)} (left at random init): {head(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} (ignored): {head(self.unexpected)}")
        return "; ".join(lines)
