"""Prove resume by equality: a straight run == a run stopped and resumed (loss per step and weights), through the
real entry points, across epoch boundaries, in 1 process and in 2 processes under ZeRO-3 + CPU offload."""
from __future__ import annotations

import json
import signal

import pytest
import torch
from torch.testing import assert_close

from tests.integration.helpers import (ROOT, TINY, check, env, load_export, metrics, run_python, run_train,
                                       start_until_training, train_cmd)


# 12 tiles, grad_accum 2: 3 steps per epoch in both cases (batch 2 x 1 process, batch 1 x 2 processes), and
# 8 steps = 2.7 epochs. A checkpoint every step, all kept: the straight run's are compared one by one.
EPOCHS = ["data.synthetic.n_train=12", "data.synthetic.n_val=4", "run.grad_accum=2", "run.max_steps=8",
          "run.eval_every=4", "run.checkpoint_every=1", "checkpoint.keep_last=10"]
# step -> (epoch, micro-batches of it consumed) saved at that step: mid-epoch 0, exactly the end of epoch 0
# (nothing left to skip), mid-epoch 2 (a skip inside an epoch whose order and flips are not epoch 0's)
STOPS = {1: (0, 2), 3: (0, 6), 7: (2, 2)}


def _losses(job, split="train"):
    return [(r["step"], r["loss"]) for r in metrics(job, split)]


def _compare(straight, resumed, bitwise: bool):
    def same(x, y) -> bool:
        if bitwise:
            return torch.equal(x, y)
        assert_close(x, y, rtol=1e-6, atol=1e-7)
        return True

    for split, steps in (("train", list(range(1, 9))), ("val", [4, 8])):
        a, b = _losses(straight, split), _losses(resumed, split)
        assert [s for s, _ in a] == [s for s, _ in b] == steps, (split, a, b)  # each step once
        assert same(torch.tensor([x for _, x in b]), torch.tensor([x for _, x in a])), (split, a, b)
    assert [r["lr"] for r in metrics(resumed)] == [r["lr"] for r in metrics(straight)]
    wa, wb = load_export(straight), load_export(resumed)
    assert wa.keys() == wb.keys() and len(wa) > 50
    for k in wa:
        assert same(wb[k], wa[k]), k
    # the weights moved: a run that silently skipped training would also "resume equal"
    losses = _losses(straight)
    assert losses[-1][1] < losses[0][1]


@pytest.mark.slow
@pytest.mark.parametrize("profile,nproc,batch", [
    ("full", 1, 2),
    ("zero3_offload", 2, 1),
])
def test_stopped_anywhere_and_resumed_equals_straight(tmp_path, profile, nproc, batch):
    """Stops mid-epoch 0, at the epoch boundary and mid-epoch 2, each resumed by the same command."""
    args = [*TINY, *EPOCHS, f"data.batch_size={batch}", f"data.root={tmp_path / 'data'}",
            f"memory.profile={profile}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check(run_train([*args, f"checkpoint.dir={straight}"], nproc))
    previous = None
    for stop, (epoch, in_epoch) in STOPS.items():
        r = check(run_train([*args, f"checkpoint.dir={resumed}", f"run.stop_at_step={stop}"], nproc))
        assert "Re-run the same command to continue" in r.stderr
        assert (f"resumed from {resumed / 'checkpoints' / previous}" in r.stderr) if previous else (
            "resumed from" not in r.stderr)
        previous = f"step-{stop:06d}"
        saved = json.loads((resumed / "checkpoints" / previous / "progress.json").read_text())
        assert (saved["epoch"], saved["batch_in_epoch"]) == (epoch, in_epoch), saved
        assert not (resumed / "export").exists()
    r = check(run_train([*args, f"checkpoint.dir={resumed}"], nproc))
    assert f"resumed from {resumed / 'checkpoints' / previous}" in r.stderr
    _compare(straight, resumed, bitwise=nproc == 1)
    if nproc == 1:  # every intermediate state too, not only the end
        from safetensors.torch import load_file

        for step in range(1, 9):
            a, b = (load_file(str(j / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))
                    for j in (straight, resumed))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    assert (resumed / "curves.png").stat().st_size > 1000
    assert (resumed / "config.yaml").is_file()
    assert list((resumed / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    if nproc == 2:
        assert (resumed / "checkpoints" / "step-000008" / "rng_state_1.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_rerun_continues(tmp_path):
    """SIGTERM mid-run: checkpoint at the next step boundary, clean exit 0; the same command continues."""
    job = tmp_path / "job"
    args = [*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=full", "run.max_steps=40",
            "run.checkpoint_every=100", "run.eval_every=100", f"checkpoint.dir={job}"]
    proc = start_until_training(train_cmd(args), job, ROOT, env(), timeout=300)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    saved = sorted((job / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name != "step-000040", [p.name for p in saved]
    stopped_at = int(saved[0].name.split("-")[1])
    assert "SIGTERM" in err and "Re-run the same command" in err
    # a stopped job can still be exported from its checkpoint
    r = check(run_python([ROOT / "launch/export.py", "--job", str(job)], timeout=300))
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
