"""`bench chaos`, small: 3 kill -9 (one during a checkpoint save, one during the export, one at a random moment),
each survived, and the final export bitwise equal to a straight run's."""
from __future__ import annotations

import json

import pytest

from tests.integration.helpers import ROOT, run_python


@pytest.mark.slow
def test_three_kills_leave_a_bitwise_equal_export(tmp_path):
    out = tmp_path / "bench"
    # the bench as a warm child: the runs it kills are real `python -m trainer train` processes
    r = run_python([ROOT / "launch/bench.py", "chaos", "memory.profile=full", "run.max_steps=8", "--kills", "3",
                    "--seed", "1", "--out", out], timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    doc = json.loads((out / "chaos.json").read_text())
    assert doc["kills_delivered"] == doc["kills_survived"] == 3, doc["problems"]
    assert doc["kills_by_kind"] == {"save": 1, "export": 1, "random": 1}
    assert doc["kills_confirmed_in_save"] == 1 and doc["kills_confirmed_in_export"] == 1
    assert doc["export_bitwise_equal"] and doc["export_tensors"] > 50
    assert doc["metrics_one_record_per_step"] and doc["metrics_equal"]
    resumes = [a["resumed_from"] for a in doc["attempts"][1:]]
    assert resumes[-1] == "step-000008"  # the export kill: resumed from the final checkpoint, only exported
    assert "3/3 kills survived" in r.stdout and "PASSED" in r.stdout
    assert not (out / "chaos_work").exists()  # scratch removed on success
