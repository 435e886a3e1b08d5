"""Models shared by the planner's validation tests (training and inference)."""
from __future__ import annotations

from trainer.backbones import catalog
from trainer.plan import workload as wl
def small_internvl(spec_name: str, bands: int, tile: int) -> wl.OwnBackbone:
    """InternVL2.5's architecture (InternViT + Qwen2 LM, same flavour switches) at a CPU-friendly size, deeper
    than the 2 and 4 layers the planner traces. `spec_name` keys the planner's cache."""
    cfg = catalog.tiny_config("internvl2_5_4b")
    v, t = cfg.vision_config, cfg.text_config
    v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers = 96, 384, 4, 7
    t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 96, 256, 4, 2
    wl._set_layers(t, 6)
    t.head_dim = 24
    kwargs = {"mode": "full", "in_channels": bands, "image_size": tile}
    spec = {"backbone": spec_name, "config": cfg.to_dict(), "kwargs": kwargs}
    return wl.OwnBackbone(catalog.get("internvl2_5_4b"), kwargs, spec, config_value=cfg)
