"""`launch/sweep.py` on a matrix, for real: a job that fails inside `launch/train.py` is recorded and the sweep goes
on; SIGTERM to the sweep stops the running job at a checkpoint; re-running resumes it; once finished it is
skipped; the summary holds final metrics, planned (the memory planner) and observed memory, and time per job."""
from __future__ import annotations

import csv
import io
import json
import signal
import sys

import pytest
import yaml

from tests.integration.helpers import ROOT, TINY, env, metrics, run_python, start_until_training


@pytest.mark.slow
def test_matrix_sweep_failure_stop_resume_skip(tmp_path):
    out = tmp_path / "sweep"
    matrix = tmp_path / "matrix.yaml"
    # zero3_nvme without memory.nvme_path fails inside the job (rendering its DeepSpeed config); it is the first
    # job, so the sweep must go on to `full` after it.
    matrix.write_text(yaml.safe_dump({"sweep": {
        "base": str(ROOT / "launch/configs/demo.yaml"), "dir": str(out),
        "axes": {"memory.profile": ["zero3_nvme", "full"]},
        "overrides": {"data.root": str(tmp_path / "data")}}}))
    # command-line overrides come last, after the matrix's: TINY's intervals are replaced here
    cmd = [sys.executable, str(ROOT / "launch/sweep.py"), str(matrix), *TINY, "run.max_steps=30",
           "run.checkpoint_every=100", "run.eval_every=100"]
    full = out / "full"

    proc = start_until_training(cmd, full, tmp_path, env())
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    state = json.loads((out / "sweep.json").read_text())["jobs"]
    assert state["zero3_nvme"]["status"] == "failed" and state["zero3_nvme"]["exit_code"] == 2
    assert "nvme_path" in state["zero3_nvme"]["error"] and "Traceback" not in state["zero3_nvme"]["error"]
    assert state["full"]["status"] == "interrupted"
    assert len(list((full / "checkpoints").iterdir())) == 1

    # the re-runs: the sweep as a warm child (its jobs are still real `launch/train.py` processes)
    r = run_python(cmd[1:], cwd=tmp_path, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # 1: a job failed
    assert "full: running (resuming)" in r.stdout and "full: done" in r.stdout
    assert "resumed from" in (full / "sweep.stderr.log").read_text()
    assert [x["step"] for x in metrics(full)] == list(range(1, 31))
    rows = {row["job"]: row for row in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))}
    row = rows["full"]
    assert row["status"] == "done" and row["step"] == "30" and row["attempts"] == "2"
    assert float(row["val_mIoU"]) > 0 and float(row["observed_peak_mb"]) > 100 and float(row["seconds"]) > 0
    assert float(row["planned_peak_mb"]) > 0 and float(row["tree_peak_rss_mb"]) >= float(row["observed_peak_mb"])
    assert rows["zero3_nvme"]["status"] == "failed" and rows["zero3_nvme"]["exit_code"] == "2"
    md = (out / "summary.md").read_text()
    assert "| full | full | done | 30 |" in md and "## zero3_nvme: failed (exit code 2)" in md

    log_size = (full / "sweep.stderr.log").stat().st_size
    r = run_python(cmd[1:], cwd=tmp_path, timeout=600)
    assert r.returncode == 1 and "full: finished earlier, skipped" in r.stdout, r.stdout[-3000:]
    assert (full / "sweep.stderr.log").stat().st_size == log_size
