"""`accelerate launch` as a first-class path (exit codes, signals to the launcher or its group, signals during
start-up) and the job-dir lock, through the real launchers with the hook `launch/setup.sh` installs."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.helpers import BIN, ROOT, TINY, env, metrics, run_train, train_cmd
from trainer import launch_hook

LONG = ["run.max_steps=100000", "run.checkpoint_every=100000", "run.eval_every=100000", "memory.profile=full"]


@pytest.fixture(autouse=True)
def hook_installed():
    assert launch_hook.pth_path().is_file(), "terrascale's accelerate-launch hook is not installed: bash launch/setup.sh"


def accelerate_one(overrides: list[str]) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", str(ROOT / "launch/train.py"), "--config",
            str(ROOT / "launch/configs/demo.yaml"), *overrides]


def start(cmd: list[str]) -> subprocess.Popen:
    # own session: a signal to "the launcher's group" must not reach pytest
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def trainers(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The launcher's training processes. A child still showing the launcher's own command line is a fork not yet
    exec'd (the launcher's `ldconfig -p` at import, or the trainer a moment before exec): not training. Taking one
    for the trainer once sent SIGTERM to a launcher still importing, which rightly died of it (a CI run)."""
    parent = psutil.Process(launcher.pid)
    own = parent.cmdline()
    found = []
    for c in parent.children():
        try:
            cmdline = c.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmdline != own and any(a.endswith("launch/train.py") for a in cmdline):
            found.append(c)
    return found


def wait_for(cond, what: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def training(job: Path, steps: int = 2):
    return lambda: (job / "metrics.jsonl").is_file() and len(metrics(job)) >= steps


def finish(proc: subprocess.Popen, children: list[psutil.Process]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=400)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"training processes outlived the launcher: {alive}"
    return out, err


def test_exit_code_reaches_the_shell_unchanged():
    """A config error exits 2 through `accelerate launch`, 1 process and 2, with no launcher traceback."""
    bad = ["run.nope=1"]
    procs = {1: start(accelerate_one(bad)), 2: start(train_cmd(bad, nproc=2))}
    for n, p in procs.items():
        out, err = p.communicate(timeout=400)
        assert p.returncode == 2, f"{n} process(es): exit {p.returncode}\n{err[-3000:]}"
        assert "run.nope: unknown key" in err
        assert "Traceback" not in err and "CalledProcessError" not in err and "ChildFailedError" not in err


def test_sigterm_to_launcher_saves_and_the_lock_refuses_a_second_run(tmp_path):
    """SIGTERM to the launcher's pid only: forwarded, checkpoint at the next step, every process exits 0, the
    launcher last. Meanwhile a second run on the same job dir exits 2 naming the pid that holds it."""
    job = tmp_path / "job"
    args = [*TINY, *LONG, f"data.root={tmp_path / 'data'}", f"checkpoint.dir={job}"]
    launcher = start(accelerate_one(args))
    wait_for(training(job), "training to start")
    children = trainers(launcher)
    assert len(children) == 1
    second = run_train(args, timeout=400)  # the lock is the trainer's, not the launcher's: a warm child will do
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (pid {children[0].pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    records = len(metrics(job))
    launcher.send_signal(signal.SIGTERM)
    out, err = finish(launcher, children)
    assert launcher.returncode == 0, err[-4000:]
    assert "SIGTERM forwarded to 1 training process(es)" in err and "Re-run the same command" in err
    saved = [p.name for p in (job / "checkpoints").iterdir()]
    assert len(saved) == 1 and int(saved[0][5:]) >= records, saved
    assert len(metrics(job)) == int(saved[0][5:])  # the second run wrote no record


def test_ctrl_c_to_the_group_of_two_processes_saves_once(tmp_path):
    """SIGINT to the launcher's whole group, as a terminal's Ctrl-C does (2 processes, torch elastic): each rank
    sees it once (a second would abort), all save one checkpoint and exit 0."""
    job = tmp_path / "job"
    launcher = start(train_cmd([*TINY, *LONG, f"data.root={tmp_path / 'data'}", f"checkpoint.dir={job}"], nproc=2))
    wait_for(training(job), "training to start")
    children = trainers(launcher)
    assert len(children) == 2
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = finish(launcher, children)
    assert launcher.returncode == 0, err[-4000:]
    assert "aborted" not in err and "Traceback" not in err
    (saved,) = (job / "checkpoints").iterdir()
    assert (saved / "rng_state_0.safetensors").is_file() and (saved / "rng_state_1.safetensors").is_file()


def test_signal_during_start_up_exits_cleanly_with_nothing_written(tmp_path):
    """SIGTERM to the launcher while training is still importing / building: exit 0, no config, metrics or
    checkpoint in the job dir (only the lock file)."""
    job = tmp_path / "job"
    launcher = start(accelerate_one([*TINY, *LONG, f"data.root={tmp_path / 'data'}", f"checkpoint.dir={job}"]))
    wait_for(lambda: trainers(launcher), "the training process to start")
    time.sleep(3.0)  # inside its imports (torch alone takes longer)
    children = trainers(launcher)
    launcher.send_signal(signal.SIGTERM)
    out, err = finish(launcher, children)
    assert launcher.returncode == 0, err[-4000:]
    assert "stopped on request during start-up" in err and "Traceback" not in err
    assert sorted(p.name for p in job.iterdir()) == ["job.lock"]
