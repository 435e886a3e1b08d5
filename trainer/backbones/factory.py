"""Build a registered backbone by name: config (checkpoint's, tiny or catalog) → model → load → finalize.

This is what every name in `REGISTERED` calls. Kwargs are closed: an unknown one is a ConfigError
naming it and the nearest valid kwarg.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import time
from pathlib import Path

from trainer.backbones import catalog, loading, stream
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

REGISTERED = ("internvl2_5_4b", "internvl2_5_8b", "internvl2_26b", "internvl2_40b", "qwen2_vl_7b", "gemma3_4b",
              "gemma3_27b", "earthmind_4b", "granite_4_tiny", "clay_v1", "clay_v1_5", "satmae_vit_l")
COMMON_KWARGS = ("tiny", "size", "pretrained", "pretrained_path", "checkpoint_layout", "trust_remote_code",
                 "allow_pickle")
# model_type values in a checkpoint's config.json that each family reads natively
_NATIVE_TYPES = {"internvl": "internvl", "qwen2_vl": "qwen2_vl", "gemma3": "gemma3",
                 "granite_hybrid": "granitemoehybrid"}
# OpenGVLab's remote-code InternVL and EarthMind's Sa2VA config: same vision_config/llm_config JSON
_INTERNVL_CHAT_TYPES = ("internvl_chat", "sa2va_chat")
_REMOTE_LLM = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "llama", "LlamaForCausalLM": "llama"}


def family_class(family: str):
    from trainer.backbones import geo, llm, vlm

    if family in vlm.FAMILIES:
        return vlm.FAMILIES[family]
    return {"granite_hybrid": llm.LLMTokenEncoder, "clay": geo.ClayBackbone, "satmae": geo.SatMAEBackbone}[family]


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ConfigError(f"model.backbone_kwargs.pretrained_path: {where} has no {key!r}")
    return d[key]


def internvl_chat_config(cfg: dict, where: str):
    """OpenGVLab's remote-code `internvl_chat` config.json → native InternVLConfig, read as JSON (no code)."""
    v, t = _need(cfg, "vision_config", where), _need(cfg, "llm_config", where)
    arch = (t.get("architectures") or ["?"])[0]
    if arch not in _REMOTE_LLM:
        raise ConfigError(f"model.backbone_kwargs.pretrained_path: {where} has LLM {arch}; "
                          f"supported: {sorted(_REMOTE_LLM)}")
    vision = {k: _need(v, k, where) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads")}
    vision.update(attention_bias=v.get("qkv_bias", True), use_qk_norm=v.get("qk_normalization", False),
                  norm_type=v.get("norm_type", "layer_norm"), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
                  image_size=v.get("image_size", 448), patch_size=v.get("patch_size", 14))
    text = {k: _need(t, k, where) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "vocab_size")}
    text.update(model_type=_REMOTE_LLM[arch], rms_norm_eps=t.get("rms_norm_eps", 1e-6),
                rope_theta=t.get("rope_theta", 1e6),
                num_key_value_heads=t.get("num_key_value_heads", text["num_attention_heads"]))
    return catalog.make_config("internvl", dict(vision_config=vision, text_config=text, tie_word_embeddings=False,
                                                downsample_ratio=cfg.get("downsample_ratio", 0.5)))


def backbone_config_for(entry: catalog.Entry, root: Path | None, tiny: bool, trust_remote_code: bool):
    if entry.family not in _NATIVE_TYPES:
        return catalog.tiny_config(entry.name) if tiny else dict(entry.dims)
    cfg = loading.read_config_json(root) if root is not None else None
    if cfg is None:
        if root is not None:
            log.warning("%s: no config.json beside the weights; using the catalog's %s dimensions", root,
                        "tiny" if tiny else "real")
        return catalog.tiny_config(entry.name) if tiny else catalog.hf_config(entry.name)
    model_type, where = cfg.get("model_type"), f"{root}/config.json"
    if model_type == _NATIVE_TYPES[entry.family]:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(root if root.is_dir() else root.parent))
    if model_type in _INTERNVL_CHAT_TYPES and entry.family == "internvl":
        return internvl_chat_config(cfg, where)
    if trust_remote_code and entry.family == "internvl":
        from transformers import AutoConfig  # runs the repository's configuration code: the user asked for it
        return internvl_chat_config(AutoConfig.from_pretrained(str(root), trust_remote_code=True).to_dict(), where)
    raise ConfigError(f"model.backbone_kwargs.pretrained_path: {where} is model_type {model_type!r}, which the "
                      f"{entry.name} backbone ({entry.family}) cannot read; point it at a {entry.family} checkpoint "
                      "(or set trust_remote_code: true to read an unknown InternVL config with its own code)")


def check_kwargs(cls, kwargs: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "config", "dims")]
    issues = []
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid + list(COMMON_KWARGS), n=1)
            issues.append(f"model.backbone_kwargs.{key}: unknown" + (f"; did you mean {near[0]!r}?" if near else
                                                                     f"; valid: {sorted(valid + list(COMMON_KWARGS))}"))
    if issues:
        raise ConfigError(issues)


def build_backbone(name: str, *, tiny: bool = False, size: str | None = None, pretrained: bool = False,
                   pretrained_path: str | None = None, checkpoint_layout: str = "auto",
                   trust_remote_code: bool = False, allow_pickle: bool = False, **kwargs):
    """Build registered backbone `name`; see docs/adding_a_backbone.md for the kwargs."""
    try:
        return _build(name, tiny, size, pretrained, pretrained_path, checkpoint_layout, trust_remote_code,
                      allow_pickle, kwargs)
    except KeyError as e:
        # TerraTorch's registry turns a KeyError from a constructor into "model not found in any
        # registry" and hides the cause; surface our own as what it is.
        raise RuntimeError(f"building backbone {name!r} failed: KeyError {e}") from e


def _build(name, tiny, size, pretrained, pretrained_path, layout, trust_remote_code, allow_pickle, kwargs):
    entry = catalog.get(name)
    if size not in (None, "tiny", "full"):
        raise ConfigError(f"model.backbone_kwargs.size: {size!r} is not 'tiny' or 'full'")
    tiny = tiny or size == "tiny"
    cls = family_class(entry.family)
    check_kwargs(cls, kwargs)
    if pretrained and not pretrained_path and not entry.hub_id:
        raise ConfigError(f"model.backbone_kwargs.pretrained_path: {name} has no default checkpoint; give one")
    source = pretrained_path or (entry.hub_id if pretrained else None)
    root = loading.resolve_path(source) if source else None
    config = backbone_config_for(entry, root, tiny, trust_remote_code)
    if root is None:
        model = cls(config, **kwargs)
        model.finalize()
        return model
    spec = stream.current_spec()
    t0 = time.perf_counter()
    with stream.skeleton(spec):  # Hugging Face parts without weights (or partitioned under ZeRO-3)
        model = cls(config, **kwargs)
    model.truncate()  # layers no feature reads are dropped before loading: never read
    built = time.perf_counter() - t0
    model.load_report = _load(model, entry, root, config, layout, allow_pickle, spec)
    model.load_report.stats.seconds["build"] = built
    model.finalize()
    return model


# families whose native checkpoints need transformers' own conversions (Granite's legacy MoE layout)
_CONVERTED_NATIVE = ("granite_hybrid",)


def _load(model, entry: catalog.Entry, root: Path, config, layout: str, allow_pickle: bool, spec):
    from trainer.backbones import geo

    files = loading.weight_files(root, allow_pickle)
    pickled = any(f.suffix in loading.PICKLE_SUFFIXES for f in files)
    if entry.family in _NATIVE_TYPES:
        if layout == "auto":
            layout = loading.detect_layout(loading.checkpoint_keys(root, allow_pickle))
        skip = list(loading.KNOWN_UNUSED)
        if getattr(model, "mode", None) == catalog.VISION:  # the vision tower alone was built
            skip += [r"^language_model\.", r"^multi_modal_projector\.", r"^visual\.merger\."]
        if layout not in ("native", "internvl_remote", "earthmind"):
            loading.map_vlm_keys({}, entry.family, layout, config)  # raises the unknown-layout error
        mapper = lambda sd: loading.map_vlm_keys(sd, entry.family, layout, config)  # noqa: E731
    else:
        skip = list(geo.GEO_UNUSED)
        mapper = lambda sd: geo.map_geo_keys(sd, entry.family)  # noqa: E731
    new_modules = ("input_adapter.", "patch_embed.", "pos_embed")  # ours, never in an upstream checkpoint
    ignore = lambda k: k.startswith(new_modules)  # noqa: E731
    converted = (entry.family in _CONVERTED_NATIVE and layout == "native"
                 and loading.read_config_json(root) is not None)
    if converted or pickled:
        # These cannot be streamed: transformers' conversions need the native model; pickles load whole.
        if converted:
            mapped, unexpected, mismatched = loading.load_native(entry.hf_classes[1], root, config, entry.family,
                                                                 dtype=spec.weight_dtype)
            if mismatched:
                raise ConfigError([f"model.backbone_kwargs.pretrained_path: shape mismatch {m}" for m in mismatched])
        else:
            mapped, unexpected = mapper(loading.read_state_dict(root, allow_pickle)), []
        report = stream.place_mapped(model, mapped, str(root), skip, ignore, spec, unexpected=unexpected)
    else:
        report = stream.stream_into(model, files, mapper, str(root), skip, ignore, spec)
    (log.warning if report.missing or report.unexpected else log.info)(report.summary())
    return report


def accepted_kwargs(name: str) -> list[str]:
    """Every `model.backbone_kwargs` key registered backbone `name` takes (what `check_kwargs` admits);
    for checking a config before anything is built. Cheap: imports no TerraTorch."""
    params = inspect.signature(family_class(catalog.get(name).family).__init__).parameters
    named = [p for p, v in params.items() if p not in ("self", "config", "dims")
             and v.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    return sorted(set(named) | set(COMMON_KWARGS))
