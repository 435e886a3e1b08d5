"""`terrascale bench-report` on CPU with the tiny Prithvi: one subprocess per backbone × profile, the real loop,
JSON + markdown + PNG, measured memory beside the planner's."""
from __future__ import annotations

import json

import pytest

from tests.integration.helpers import TINY, run_python


@pytest.mark.slow
def test_bench_report_cpu_tiny(tmp_path):
    out = tmp_path / "report"
    overrides = [o for o in TINY if not o.startswith("run.")] + [f"data.root={tmp_path / 'data'}"]
    # the report's parent as a warm child; each of its rows is still a real subprocess
    r = run_python(["-m", "trainer", "bench-report", "--backbones", "prithvi_eo_tiny", "--profiles",
                    "full,zero3_offload", "--steps", "3", "--warmup", "1", "--out", out, *overrides], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {x["profile"]: x for x in report["results"]}
    assert set(rows) == {"full", "zero3_offload"} and all(x["status"] == "ok" for x in rows.values())
    for x in rows.values():
        assert x["device"] == "cpu" and x["peak_device_source"] == "tracked tensors (CPU)"
        assert x["samples"] == 3 * 4 and x["samples_per_s"] > 0
        assert 0 < x["tracked_peak_mb"] == x["peak_device_mb"] < x["peak_rss_mb"]
        assert x["planned_device_mb"] > 0 and x["planned_cpu_mb"] > 0
    assert rows["zero3_offload"]["zero_stage"] == 3 and rows["full"]["zero_stage"] == 0
    # tiny Prithvi + UNet decoder: 4.26M fp32 parameters, and AdamW keeps two fp32 moments per parameter
    full = rows["full"]["tracked_mb"]
    assert 15 < full["params"] < 18 and abs(full["optimizer"] - 2 * full["params"]) < 0.01 * full["params"]
    md = (out / "report.md").read_text()
    assert "| backbone | profile | samples/s |" in md and md.count("| prithvi_eo_tiny |") == 2
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
