"""`launch/bench.py planner`: each row is a real `launch/plan.py` process, timed, with its own peak RSS."""
from __future__ import annotations

import json
import subprocess

from tests.integration.helpers import ROOT, run_python


def _bench(*args: str) -> subprocess.CompletedProcess:
    # the bench as a warm child: each row it times is its own real `launch/plan.py` process
    return run_python([ROOT / "launch/bench.py", "planner", *args], timeout=600)


def test_planner_bench_times_a_real_plan_and_writes_results(tmp_path):
    r = _bench("--backbones", "terramind_v1_tiny", "--warm-only", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads((tmp_path / "planner.json").read_text())
    (row,) = doc["rows"]
    assert (row["backbone"], row["mode"], "cold" in row) == ("terramind_v1_tiny", "encoder", False)
    warm = row["warm"]
    assert warm["exit_code"] == 0 and warm["auto"] == "full", warm
    # a Python process that imported torch: tens of MiB at the very least, and it took measurable time
    assert warm["peak_rss_mib"] > 50 and warm["seconds"] > 0.1
    assert "| fit table | terramind_v1_tiny (encoder) |" in r.stdout


def test_planner_bench_refuses_unknown_backbones_and_configs(tmp_path):
    r = _bench("--backbones", "prithvi_eo_v9", "--out", str(tmp_path))
    assert r.returncode == 2 and "prithvi_eo_v9: not in the catalog" in r.stderr
    r = _bench("--config", "launch/configs/demo.yaml", "--out", str(tmp_path))
    assert r.returncode == 2 and "takes no --config" in r.stderr
    assert not (tmp_path / "planner.json").exists()
