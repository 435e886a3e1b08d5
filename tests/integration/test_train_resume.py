"""Prove resume by equality: a straight run == a run interrupted half-way and resumed (loss per step and
final weights), through the real entry points, in 1 process and in 2 processes under ZeRO-3 + CPU offload."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

from tests.integration.helpers import (ROOT, TINY, check, env, load_export, metrics, run_train, train_cmd)


def _compare(straight, resumed):
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]), rtol=1e-5, atol=1e-6)
    assert_close(torch.tensor([r["lr"] for r in b]), torch.tensor([r["lr"] for r in a]))
    wa, wb = load_export(straight), load_export(resumed)
    assert wa.keys() == wb.keys() and len(wa) > 50
    for k in wa:
        assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # the weights moved: a run that silently skipped training would also "resume equal"
    first = metrics(straight)
    assert first[-1]["loss"] < first[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("profile,nproc", [("full", 1), ("zero3_offload", 1), ("zero3_offload", 2)])
def test_interrupted_and_resumed_equals_straight(tmp_path, profile, nproc):
    data = [f"data.root={tmp_path / 'data'}", f"memory.profile={profile}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check(run_train([*TINY, *data, f"checkpoint.dir={straight}"], nproc))
    r = check(run_train([*TINY, *data, f"checkpoint.dir={resumed}", "run.stop_at_step=3"], nproc))
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"], ckpts
    assert not (resumed / "export").exists()
    assert "Re-run the same command to continue" in r.stderr
    r = check(run_train([*TINY, *data, f"checkpoint.dir={resumed}"], nproc))
    assert "resumed from" in r.stderr and "step-000003" in r.stderr
    _compare(straight, resumed)
    job = resumed
    assert (job / "curves.png").stat().st_size > 1000
    assert (job / "config.yaml").is_file()
    assert list((job / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    if nproc == 2:
        assert (job / "checkpoints" / "step-000006" / "rng_state_1.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_rerun_continues(tmp_path):
    """SIGTERM mid-run: checkpoint at the next step boundary, clean exit 0; the same command continues."""
    job = tmp_path / "job"
    args = [*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=full", "run.max_steps=40",
            "run.checkpoint_every=100", "run.eval_every=100", f"checkpoint.dir={job}"]
    proc = subprocess.Popen(train_cmd(args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = job / "metrics.jsonl"
        if m.is_file() and len(metrics(job)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    saved = sorted((job / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name != "step-000040", [p.name for p in saved]
    stopped_at = int(saved[0].name.split("-")[1])
    assert "SIGTERM" in err and "Re-run the same command" in err
    # a stopped job can still be exported from its checkpoint
    r = check(subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--job", str(job)], cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=300))
    assert "model.safetensors" in r.stdout and (job / "export" / "stats.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(str(job / "checkpoints" / f"step-{stopped_at:06d}" / "model.safetensors"))
    exported = load_export(job)
    assert saved.keys() == exported.keys() and len(saved) > 50
    for k in saved:
        assert_close(exported[k], saved[k])
    r = check(run_train(args))
    assert f"at step {stopped_at}" in r.stderr
    assert [x["step"] for x in metrics(job)] == list(range(1, 41))
    assert (job / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_false_refuses_existing_job(tmp_path):
    job = tmp_path / "job"
    base = [*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=full", "run.max_steps=2",
            f"checkpoint.dir={job}"]
    check(run_train(base))
    r = run_train([*base, "checkpoint.resume=false"])
    assert r.returncode == 1
    assert "checkpoint.resume is false" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_dir_is_a_clear_error(tmp_path):
    r = run_train([*TINY, "data.kind=geotiff", f"data.root={tmp_path / 'nowhere'}", f"checkpoint.dir={tmp_path}/j"],
                  timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(tmp_path / "nowhere") in r.stderr and "Traceback" not in r.stderr
