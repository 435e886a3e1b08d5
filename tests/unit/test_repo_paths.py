"""Paths trainer/ modules compute from their own `__file__` point into this repository: a module that moves to
another depth must change its `parents[n]` (a sweep once launched <root>/trainer/launch/train.py)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PATHS = [("trainer.config", "DEMO_CONFIG"), ("trainer.memory.deepspeed", "PRESET_DIR"),
         ("trainer.plan.fit_table", "CONFIGS"), ("trainer.plan.plan_bench", "ROOT"), ("trainer.sweep.sweep", "ROOT"),
         ("trainer.bench.bench_load", "ROOT"), ("trainer.bench.bench_predict", "ROOT"),
         ("trainer.plan.plan_cache", "SEED_PATH")]


@pytest.mark.parametrize("module,name", PATHS)
def test_path_is_in_the_repository(module, name):
    path = Path(getattr(importlib.import_module(module), name)).resolve()
    assert path.exists() and path.is_relative_to(ROOT), f"{module}.{name} = {path}"
    if name == "ROOT":
        assert path == ROOT and (path / "launch" / "train.py").is_file()


def test_every_path_from_file_is_listed():
    """A new `Path(__file__)...parents[n]` in trainer/ joins PATHS."""
    listed = {m for m, _ in PATHS}
    found = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "trainer").rglob("*.py")
             if "__file__).resolve().parents[" in p.read_text()}
    assert found and found <= listed, sorted(found - listed)
