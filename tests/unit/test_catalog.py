"""The catalog's real dimensions: meta-built counts vs published totals, modes, traps, import cost."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.backbones import catalog
from trainer.errors import ConfigError

NAMES = catalog.names()
HF_NAMES = [n for n in NAMES if catalog.get(n).family in (*catalog.VLM_FAMILIES, "granite_hybrid")]


def test_catalog_lists_every_backbone_of_the_issue():
    assert {"internvl2_5_4b", "internvl2_5_8b", "internvl2_26b", "internvl2_40b", "qwen2_vl_7b", "gemma3_4b",
            "gemma3_27b", "granite_4_tiny", "earthmind_4b", "prithvi_eo_v1_100", "prithvi_eo_v2_300",
            "prithvi_eo_v2_600", "terramind_v1_tiny", "terramind_v1_small", "terramind_v1_base",
            "terramind_v1_large", "clay_v1", "clay_v1_5", "satmae_vit_l"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_meta_count_matches_published_within_one_percent(name):
    entry = catalog.get(name)
    total = catalog.param_counts(name)["total"]
    assert abs(total / entry.published_params - 1) < 0.01, (
        f"{name}: meta build has {total / 1e9:.4f}B, published {entry.published_params / 1e9:.4f}B "
        f"({entry.params_source})")


@pytest.mark.parametrize("name", HF_NAMES)
def test_full_mode_drops_head_and_embeddings_and_builds_what_it_counts(name):
    counts = catalog.param_counts(name)
    assert counts["dropped_in_full"] > 0
    assert counts["dropped_in_full"] == counts["text_embeddings"] + counts["lm_head"]
    mode = catalog.FULL if catalog.FULL in catalog.get(name).modes else catalog.ENCODER
    built = catalog.build_meta(name, mode)
    assert catalog._count(built) == counts[mode] == counts["total"] - counts["dropped_in_full"]
    assert all(p.device.type == "meta" for p in built.parameters())
    if catalog.VISION in catalog.get(name).modes:
        assert catalog._count(catalog.build_meta(name, catalog.VISION)) == counts["vision_tower"] > 0


def test_tied_models_drop_the_shared_matrix_once():
    gemma = catalog.param_counts("gemma3_4b")  # tied: the head is the embedding table
    assert gemma["lm_head"] == 0 and gemma["text_embeddings"] == 262208 * 2560
    intern = catalog.param_counts("internvl2_5_4b")  # untied: both go
    assert intern["lm_head"] == intern["text_embeddings"] == 151674 * 2048


def test_building_the_40b_on_meta_takes_seconds():
    start = time.perf_counter()
    model = catalog.build_meta("internvl2_40b", catalog.FULL)
    elapsed = time.perf_counter() - start
    assert catalog._count(model) > 39e9
    assert elapsed < 10, f"meta build of InternVL2-40B took {elapsed:.1f}s"


def test_config_traps_are_set_explicitly():
    assert catalog.hf_config("internvl2_5_8b").tie_word_embeddings is False  # class default is True
    text = catalog.hf_config("qwen2_vl_7b").text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (3584, 28, 152064)  # defaults: 72B
    assert catalog.hf_config("gemma3_27b").vision_config.vision_use_head is False


@pytest.mark.parametrize("name", HF_NAMES)
def test_tiny_config_is_the_same_architecture_class(name):
    real, tiny = catalog.hf_config(name), catalog.tiny_config(name)
    assert type(tiny) is type(real)
    if hasattr(real, "vision_config"):
        assert type(tiny.vision_config) is type(real.vision_config)
        assert type(tiny.text_config) is type(real.text_config)
        assert tiny.text_config.hidden_size < real.text_config.hidden_size
    if name == "internvl2_26b":  # InternViT-6B flavour survives shrinking
        assert tiny.vision_config.norm_type == "rms_norm" and tiny.vision_config.use_qk_norm
    if name == "granite_4_tiny":  # the config normalises mamba/attention to these names
        assert set(tiny.layer_types) == set(real.layer_types) == {"linear_attention", "full_attention"}


def test_unknown_name_and_unsupported_mode_are_config_errors():
    with pytest.raises(ConfigError, match="unknown catalog entry"):
        catalog.get("internvl9")
    with pytest.raises(ConfigError, match="supports"):
        catalog.build_meta("granite_4_tiny", catalog.VISION)


def test_entries_are_frozen():
    entry = catalog.get("gemma3_4b")
    with pytest.raises(AttributeError):
        entry.published_params = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        entry.dims["text_config"] = {}  # type: ignore[index]


def test_importing_the_catalog_does_not_import_terratorch_or_accelerate():
    code = ("import sys, trainer.backbones.catalog as c; c.hf_config('internvl2_5_4b'); "
            "print(sorted(m for m in ('terratorch', 'accelerate') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
