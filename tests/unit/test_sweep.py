"""Sweep: matrix expansion, job commands, the summary, and the runner's control flow with stand-in jobs
(tiny Python children that behave like `launch/train.py`: metrics.jsonl, exit codes, SIGTERM → save + exit 0)."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from trainer.config import apply_overrides
from trainer.errors import ConfigError
from trainer.sweep import sweep as sw
from trainer.sweep.sweep_summary import render_csv, render_markdown, write_summary

DEMO = Path(__file__).resolve().parents[2] / "launch" / "configs" / "demo.yaml"


def _matrix(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(body)
    return p


@pytest.mark.parametrize("value", ["prithvi_eo_tiny", "123", "true", "null", "a: b", 3e-4, 7, True, None, [1, 2],
                                   {"a": 1}])
def test_override_parses_back_to_the_value(value):
    key, text = sw.override("x.y", value).split("=", 1)
    assert apply_overrides({}, [f"{key}={text}"]) == {"x": {"y": value}}


def test_matrix_expands_to_distinct_jobs_in_order(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.yaml").write_text("name: base\n")
    m = _matrix(tmp_path, "sweep:\n  base: cfg/base.yaml\n  axes:\n    model.backbone: [a, b]\n"
                          "    memory.profile: [full, zero3_offload, full]\n  overrides: {run.max_steps: 5}\n")
    s = sw.load_sweep([str(m)], ["run.seed=3"], sweep_dir=str(tmp_path / "out"))
    names = [j.name for j in s.jobs]
    assert names == ["a-full", "a-zero3_offload", "a-full-2", "b-full", "b-zero3_offload", "b-full-2"]
    assert len({s.dir / n for n in names}) == 6
    job = s.jobs[1]
    assert job.config == str(tmp_path / "cfg" / "base.yaml")  # relative to the matrix file
    assert job.overrides == ("run.max_steps=5", "model.backbone=a", "memory.profile=zero3_offload", "run.seed=3")
    assert job.axes == (("model.backbone", "a"), ("memory.profile", "zero3_offload"))
    cmd = sw.job_command(job, s.launcher, s.dir / job.name)
    assert cmd[:2] == [sys.executable, str(sw.TRAIN_SCRIPT)]
    assert cmd[-2:] == [f"checkpoint.dir={s.dir / job.name}", "checkpoint.resume=auto"]


def test_matrix_dir_default_and_plain_configs(tmp_path):
    m = _matrix(tmp_path, f"sweep:\n  base: {DEMO}\n  axes: {{optim.lr: [0.001]}}\n  dir: {tmp_path / 'here'}\n")
    s = sw.load_sweep([str(m), str(DEMO)])
    assert s.dir == tmp_path / "here"
    assert [j.name for j in s.jobs] == ["0.001", "demo"] and s.jobs[1].overrides == ()
    assert sw.load_sweep([str(DEMO)]).dir == Path("runs/sweeps/demo")


def test_matrix_errors_name_the_key(tmp_path):
    m = _matrix(tmp_path, f"sweep:\n  base: {DEMO}\n  axis: {{a: [1]}}\n  procesess: 2\n")
    with pytest.raises(ConfigError) as e:
        sw.load_sweep([str(m)])
    text = str(e.value)
    assert "sweep.axis: unknown key; did you mean 'axes'?" in text and "sweep.procesess" in text
    m = _matrix(tmp_path, f"model: {{backbone: x}}\nsweep:\n  base: {DEMO}\n")
    with pytest.raises(ConfigError, match="model: a matrix file holds only the `sweep:` section"):
        sw.load_sweep([str(m)])
    m = _matrix(tmp_path, "sweep:\n  base: nowhere.yaml\n  axes: {a: []}\n")
    with pytest.raises(ConfigError, match="sweep.base: nowhere.yaml does not exist"):
        sw.load_sweep([str(m)])


def test_launcher_commands():
    job = sw.JobSpec("j", "c.yaml", ("a=1",))
    two = sw.job_command(job, sw.Launcher(processes=2), Path("d"), port=1234)
    assert two[1:6] == ["launch", "--multi_gpu", "--num_processes", "2", "--main_process_port"] and "1234" in two
    cfg = sw.job_command(job, sw.Launcher(accelerate_config="x.yaml"), Path("d"), port=9)
    assert cfg[1:4] == ["launch", "--config_file", "x.yaml"] and "--multi_gpu" not in cfg
    assert cfg[cfg.index(str(sw.TRAIN_SCRIPT)):][:3] == [str(sw.TRAIN_SCRIPT), "--config", "c.yaml"]


def test_is_finished(tmp_path):
    assert not sw.is_finished(tmp_path)
    (tmp_path / "export").mkdir()
    assert not sw.is_finished(tmp_path)  # an export dir alone may be half-written
    (tmp_path / "export" / "model.safetensors").write_bytes(b"x")
    assert sw.is_finished(tmp_path)
    other = tmp_path / "o"
    other.mkdir()
    (other / sw.DONE_FILE).write_text("{}")
    assert sw.is_finished(other)


def _records(job_dir: Path, steps: int, loss0: float = 1.0, peak: float = 100.0) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"split": "train", "step": s, "loss": loss0 / s, "samples_per_s": 10.0 * s, "peak_rss_mb": peak + s}
             for s in range(1, steps + 1)]
    lines.append({"split": "val", "step": steps, "loss": 0.5, "mIoU": 0.8, "IoU_0": 0.1})
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn": ')


def test_summary_markdown_and_csv(tmp_path):
    jobs = (sw.JobSpec("good", "c", (), (("memory.profile", "full"),)),
            sw.JobSpec("bad", "c", (), (("memory.profile", "zero3_nvme"),)))
    s = sw.Sweep(tmp_path, jobs, sw.Launcher())
    _records(tmp_path / "good", 4)
    results = {"good": sw.JobResult("good", "done", 0, 1, 12.34, 900.0, 512.0, 1024.0),
               "bad": sw.JobResult("bad", "failed", 2, 1, 3.0, error="Traceback\nConfigError: nvme_path is not set")}
    md_path, csv_path = write_summary(s, results)
    md = md_path.read_text()
    assert "| job | memory.profile | status | step | train loss | val loss | mIoU |" in md
    assert "| good | full | done | 4 | 0.25 | 0.5 | 0.8 | 30 | 512 | 1024 | 104 | 900 | 12.3 | observed = peak_rss_mb |" in md
    assert "ConfigError: nvme_path is not set" in md and "## bad: failed (exit code 2)" in md
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert rows[0]["val_mIoU"] == "0.8" and "val_IoU_0" not in rows[0]
    assert rows[1]["status"] == "failed" and rows[1]["exit_code"] == "2" and rows[1]["step"] == ""
    assert render_csv([]) == "\r\n" and "| job |" in render_markdown([], [], "x")


# --- the runner, with stand-in jobs ----------------------------------------------------------------------

FAKE_JOB = r'''
import json, os, signal, sys, time
from pathlib import Path
job, mode = Path(sys.argv[1]), sys.argv[2]
job.mkdir(parents=True, exist_ok=True)
def rec(step):
    with open(job / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "train", "step": step, "loss": 1.0 / step, "peak_rss_mb": 50.0}) + "\n")
if mode == "fail":
    print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr)
    sys.exit(3)
if mode == "slow" and not (job / "ckpt").exists():
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    rec(1)
    while not stop:
        time.sleep(0.02)
    (job / "ckpt").write_text("1")
    print("stopped at step 1 on request; checkpoint saved. Re-run the same command to continue.", file=sys.stderr)
    sys.exit(0)
if (job / "ckpt").exists():
    print("resumed from ckpt", file=sys.stderr)
rec(2)
'''


@pytest.fixture
def no_planner(monkeypatch):
    """The planner traces a model (seconds, TerraTorch): not what these tests are about."""
    monkeypatch.setattr(sw, "planned_memory", lambda exp: (123.0, 456.0, "stub"))


def test_runner_records_failures_goes_on_stops_and_resumes(tmp_path, monkeypatch, no_planner):
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    modes = {"a-fails": "fail", "b-slow": "slow", "c-ok": "ok"}
    monkeypatch.setattr(sw, "job_command",
                        lambda job, launcher, job_dir, port=None: [sys.executable, str(script), str(job_dir),
                                                                   modes[job.name]])
    jobs = tuple(sw.JobSpec(n, str(DEMO), ("run.seed=1",)) for n in modes)
    s = sw.Sweep(tmp_path / "sweep", jobs, sw.Launcher())
    out: list[str] = []

    def stop_when_slow_job_runs():
        deadline = time.time() + 60
        while time.time() < deadline and not (s.dir / "b-slow" / "metrics.jsonl").is_file():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # to the sweep (this process), as `kill <sweep pid>` would

    t = threading.Thread(target=stop_when_slow_job_runs)
    t.start()
    assert sw.run_sweep(s, echo=out.append) == 0  # stopped on request
    t.join()
    state = json.loads((s.dir / sw.STATE_FILE).read_text())["jobs"]
    assert state["a-fails"]["status"] == "failed" and state["a-fails"]["exit_code"] == 3
    assert "RuntimeError: boom" in state["a-fails"]["error"]
    assert state["b-slow"]["status"] == "interrupted" and state["c-ok"]["status"] == "pending"
    assert not (s.dir / "c-ok").exists(), "no job may start after the stop"
    assert "stopped by SIGTERM" in out[-1]

    out.clear()
    assert sw.run_sweep(s, echo=out.append) == 1  # a-fails failed again
    state = json.loads((s.dir / sw.STATE_FILE).read_text())["jobs"]
    assert [state[n]["status"] for n in modes] == ["failed", "done", "done"]
    assert state["a-fails"]["attempts"] == 2 and state["b-slow"]["attempts"] == 2
    assert "resumed from ckpt" in (s.dir / "b-slow" / sw.STDERR_LOG).read_text()
    assert any("b-slow: running (resuming)" in line for line in out) or "ckpt" in os.listdir(s.dir / "b-slow")

    out.clear()
    sw.run_sweep(s, echo=out.append)
    assert sum("finished earlier, skipped" in line for line in out) == 2
    md = (s.dir / "summary.md").read_text()
    assert "| b-slow | done | 2 |" in md and "RuntimeError: boom" in md
    assert state["c-ok"]["planned_peak_mb"] == 123.0 and state["c-ok"]["planned_cpu_mb"] == 456.0


def test_invalid_job_config_fails_without_running(tmp_path, monkeypatch, no_planner):
    monkeypatch.setattr(sw, "run_job", lambda *a, **k: pytest.fail("an invalid config must not be run"))
    s = sw.Sweep(tmp_path, (sw.JobSpec("bad", str(DEMO), ("optim.lr=-1",)),), sw.Launcher())
    out: list[str] = []
    assert sw.run_sweep(s, echo=out.append) == 1
    state = json.loads((tmp_path / sw.STATE_FILE).read_text())["jobs"]["bad"]
    assert state["status"] == "failed" and state["exit_code"] == 2 and "optim.lr" in state["error"]


def test_a_second_sweep_on_the_same_dir_is_refused(tmp_path):
    from trainer.errors import CheckpointError

    with sw._locked(tmp_path):
        with pytest.raises(CheckpointError, match="another sweep is running"):
            with sw._locked(tmp_path):
                pass
