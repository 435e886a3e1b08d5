"""Every shipped experiment is known to the planner: it plans from the shipped seed alone (no trace, no TerraTorch
import: the fast path of `launch/plan.py` on a fresh clone), and its own profile fits a 24 GB GPU (if only
'tight', without `auto`'s margin)."""
from __future__ import annotations

import pytest

from trainer.config import load_experiment
from trainer.plan.fit_table import shipped_experiments
from trainer.plan.planner import GiB, SPEED_ORDER, plan_experiment

CONFIGS = shipped_experiments()


# (that the set is complete and non-empty is tests/unit/test_config.py's test_shipped_experiments_discovered)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_experiment_plans_from_the_seed(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TERRASCALE_CACHE", str(tmp_path / "cache"))  # a fresh user cache: only the shipped seed
    exp = load_experiment(path)
    # builders=None: a measurement the seed cannot answer has no TerraTorch to fall back on and shows up below
    # 128 GB of RAM: the 26B configs need ~92 GiB to load (the fit table says why), the rest far less
    plan = plan_experiment(exp, 24 * GiB, 128 * GiB, None, builders=None)
    assert plan.measured_now == [], (f"{path.name} is not in the planner seed: regenerate it with "
                                     "python launch/plan.py --fit-table docs/fit_table.md --readme README.md")
    assert set(plan.estimates) == set(SPEED_ORDER)
    broken = {n: e.refused for n, e in plan.estimates.items() if e.refused and not e.refused.startswith("refused")}
    assert not broken, f"{path.name}: the planner cannot run these profiles' step: {broken}"
    fitting = [n for n, e in plan.estimates.items() if e.fits]
    assert fitting, f"{path.name}: nothing fits a 24 GB GPU with 128 GB of RAM\n{plan.table()}"
    if exp.memory.profile != "auto":  # the profile the file ships with is one that fits (if only 'tight')
        assert exp.memory.profile in fitting, f"{path.name}: {exp.memory.profile} does not fit\n{plan.table()}"
    table = plan.table()
    assert all(name in table for name in SPEED_ORDER)
