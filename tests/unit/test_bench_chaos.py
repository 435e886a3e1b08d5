"""The kill harness's own checks can fail: a differing tensor, a duplicated or changed metric record."""
from __future__ import annotations

import json
import random

import torch
from safetensors.torch import save_file

from trainer.bench.bench_chaos import compare, plan_kinds


def _job(path, weight: torch.Tensor, records: list[dict]):
    (path / "export").mkdir(parents=True)
    save_file({"w": weight, "b": torch.zeros(2)}, str(path / "export" / "model.safetensors"), {"step": "2"})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [{"split": "train", "step": s, "loss": 1.0 / s, "samples_per_s": 10.0 * s} for s in (1, 2)]


def test_compare_equal_ignores_timings(tmp_path):
    a = _job(tmp_path / "a", torch.ones(3), RECORDS)
    b = _job(tmp_path / "b", torch.ones(3), [{**r, "samples_per_s": 1.0} for r in RECORDS])
    r = compare(a, b)
    assert r["export_bitwise_equal"] and r["metrics_equal"] and r["metrics_one_record_per_step"]
    assert r["leftover_temp_dirs"] == []


def test_compare_detects_a_one_ulp_difference_and_duplicated_records(tmp_path):
    a = _job(tmp_path / "a", torch.ones(3), RECORDS)
    w = torch.ones(3)
    w[1] = torch.nextafter(w[1], torch.tensor(2.0))
    b = _job(tmp_path / "b", w, [RECORDS[0], *RECORDS])
    (b / "checkpoints" / "step-000002.tmp").mkdir(parents=True)
    r = compare(a, b)
    assert not r["export_bitwise_equal"] and r["export_differing_tensors"] == ["w"]
    assert not r["metrics_one_record_per_step"] and not r["metrics_equal"]
    assert r["leftover_temp_dirs"] == ["step-000002.tmp"]


def test_kill_plan_has_saves_and_exports_last():
    kinds = plan_kinds(20, random.Random(0))
    assert len(kinds) == 20 and kinds.count("save") == 6 and kinds[-2:] == ["export", "export"]
    assert "export" not in kinds[:-2] and kinds.count("random") == 12
    assert plan_kinds(3, random.Random(0)).count("export") == 1 and sorted(plan_kinds(3, random.Random(0))[:2]) == [
        "random", "save"]


def test_a_stale_export_tmp_rewritten_under_the_same_name_counts_as_a_new_export(tmp_path):
    """The export removes a killed run's `export.tmp` and writes it again; the harness must see the new one even
    when both happen between two of its looks (a second export kill was never delivered before)."""
    import os
    import shutil
    import time

    from trainer.bench.bench_chaos import _temp_ids, fresh_temps

    job = tmp_path / "job"
    (job / "export.tmp").mkdir(parents=True)
    stale = _temp_ids(job)
    assert fresh_temps(job, stale)[0] == []  # untouched: still the earlier run's
    time.sleep(0.01)
    shutil.rmtree(job / "export.tmp")
    (job / "export.tmp").mkdir()
    (job / "export.tmp" / "model.safetensors").write_bytes(b"x")
    temps, stale = fresh_temps(job, stale)
    assert temps == ["export.tmp"] and stale == {}
