"""Profile zero3_nvme (ZeRO-Infinity: parameters and optimizer states swapped to an NVMe path) trains, stops,
resumes and exports like every profile (tests/integration/test_profiles_train.py), and really swaps. Its own file,
collected last (tests/conftest.py): it needs DeepSpeed's async_io op, which `.ci/run` compiles beside the tests."""
from __future__ import annotations

import pytest

from tests.integration.helpers import run_train, wait_for_background_ops
from tests.integration.test_profiles_train import TWO_STEPS, check_profile_run


def _nvme_problem():
    from trainer.memory import deepspeed as ds

    raw, _ = ds.load_json("zero3_bf16_nvme")
    return ds.nvme_problem(raw)


@pytest.mark.slow
def test_zero3_nvme_trains_resumes_and_swaps(tmp_path):
    wait_for_background_ops()  # CI compiles async_io beside the tests (.ci/run)
    extra = [f"memory.nvme_path={tmp_path / 'nvme'}"]
    (tmp_path / "nvme").mkdir()
    if _nvme_problem():  # no libaio on this machine: the profile must say so, not half-run
        r = run_train([*TWO_STEPS, f"data.root={tmp_path / 'data'}", "memory.profile=zero3_nvme",
                       f"checkpoint.dir={tmp_path / 'job'}", *extra])
        assert r.returncode == 2 and "async_io" in r.stderr and "libaio" in r.stderr
        return
    check_profile_run(tmp_path, "zero3_nvme", extra)
    swapped = [p.name for p in (tmp_path / "nvme").rglob("*.swp")]
    assert swapped, "nothing was swapped to the NVMe path"
    # torch's AdamW (trainer.memory.deepspeed.render) keeps its moments where DeepSpeed's swapper puts them
    assert any(n.startswith("exp_avg_sq-") for n in swapped), f"no optimizer state on the NVMe path: {swapped[:5]}"
