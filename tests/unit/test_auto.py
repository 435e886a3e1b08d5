"""Where `memory.profile: auto` takes its budgets from, and what a resumed job keeps."""
from __future__ import annotations

import pytest

from trainer.config import DEMO_CONFIG, load_experiment
from trainer.errors import ConfigError
from trainer.plan import auto
GiB = 1 << 30


def _exp(*overrides):
    return load_experiment(DEMO_CONFIG, list(overrides))


def test_flag_beats_config_beats_detected_gpu(monkeypatch):
    monkeypatch.setattr(auto, "detected_gpu_bytes", lambda: 80 * GiB)
    monkeypatch.setattr(auto, "detected_cpu_bytes", lambda: 256 * GiB)
    assert auto.budgets(_exp(), None, None) == (80 * GiB, 256 * GiB, "the detected GPU")
    exp = _exp("memory.gpu_memory=20GiB", "memory.cpu_memory=64G")
    assert auto.budgets(exp, None, None) == (20 * GiB, 64 * GiB, "memory.gpu_memory")
    assert auto.budgets(exp, "12GiB", "32GiB") == (12 * GiB, 32 * GiB, "--gpu-memory")


def test_no_gpu_and_no_budget_plans_for_the_default_card(monkeypatch):
    monkeypatch.setattr(auto, "detected_gpu_bytes", lambda: None)
    gpu, _, src = auto.budgets(_exp(), None, None)
    assert gpu == 24 * GiB and src.startswith("the default")


@pytest.mark.parametrize("value", ["24 bananas", "-3GiB", "0"])
def test_bad_sizes_are_config_errors_naming_the_key(value):
    with pytest.raises(ConfigError, match="memory.gpu_memory"):
        _exp(f"memory.gpu_memory={value}")


def test_a_resumed_job_keeps_its_frozen_profile(tmp_path):
    exp = _exp("memory.profile=auto", f"checkpoint.dir={tmp_path}")
    assert auto.frozen_profile(tmp_path) is None
    (tmp_path / "config.yaml").write_text("memory:\n  profile: zero3_offload_lora\n")
    choice = auto.choose(exp, resuming=True)
    assert choice.kept and choice.profile == "zero3_offload_lora"
    chosen, same = auto.resolve(exp, resuming=True)
    assert chosen.memory.profile == "zero3_offload_lora" and same == choice
    auto.write_plan(tmp_path, choice)  # nothing planned now: no plan.txt claiming otherwise
    assert not (tmp_path / "plan.txt").exists()


def test_other_profiles_pass_through_untouched():
    exp = _exp("memory.profile=lora")
    assert auto.resolve(exp, resuming=False) == (exp, None)
