"""Job-dir lock, disk-full handling, pickle-free training state and the accelerate-launch hook, without training."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.train import ckpt_state, joblock

from trainer import diskspace, launch_hook
from trainer.errors import CheckpointError
from trainer.train.checkpoint import MARKER, PROGRESS_FILE, Progress, list_complete, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _holder(job: Path) -> subprocess.Popen:
    code = ("import sys, time; from trainer.train.joblock import acquire; acquire(sys.argv[1]); print('held', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(job)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    job = tmp_path / "job"
    holder = _holder(job)
    try:
        with pytest.raises(joblock.JobDirBusy, match=f"pid {holder.pid} on ") as e:
            joblock.acquire(job, rank=0)
        assert e.value.exit_code == 2 and "checkpoint.dir" in str(e.value)
        assert joblock.acquire(job, rank=1) is None  # only the global rank 0 takes it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = joblock.acquire(job, rank=0)  # the kernel released the dead holder's lock; its file remains
    assert lock is not None and f'"pid": {os.getpid()}' in (job / joblock.LOCK_NAME).read_text()
    lock.release()


def test_rng_state_round_trips_without_pickle(tmp_path):
    (tmp_path / "random_states_0.pkl").write_bytes(b"accelerate's pickle")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt_state.save_rng(tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt_state.load_rng(tmp_path, 0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert not (tmp_path / "random_states_0.pkl").exists()  # never left for anything to read


def test_a_custom_checkpoint_pickle_is_refused_by_name(tmp_path):
    ckpt_state.refuse_custom_pickles(tmp_path)
    (tmp_path / "custom_checkpoint_0.pkl").write_bytes(b"\x80planted")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: a pickle, which can run code"):
        ckpt_state.refuse_custom_pickles(tmp_path)


def test_scheduler_state_round_trips_as_json(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(3):
        opt.step(), sched.step()
    ckpt_state.save_scheduler(tmp_path, sched)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    ckpt_state.load_scheduler(tmp_path, sched2)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    opt2.step(), sched2.step(), opt.step(), sched.step()
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.2]


def test_disk_full_is_recognized_from_the_real_torch_writer():
    with pytest.raises((OSError, RuntimeError)) as e:
        torch.save({"w": torch.zeros(1 << 20)}, "/dev/full")  # every write fails with ENOSPC
    assert diskspace.is_disk_full(e.value)
    assert diskspace.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))
    assert not diskspace.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not diskspace.is_disk_full(RuntimeError("size mismatch for weight"))


class _FakeAccelerator:
    """What save_checkpoint needs of an Accelerator, one process; save_state writes `size` bytes."""

    is_main_process, num_processes, process_index = True, 1, 0

    def __init__(self, size: int) -> None:
        self.size, self._models = size, [torch.nn.Linear(4, 4)]

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, m):
        return m

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        with open(Path(path) / "optimizer.bin", "wb") as f:
            for _ in range(self.size // (1 << 20)):
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB filesystem (tmpfs), so that ENOSPC comes from the kernel."""
    from tests.integration.helpers import small_filesystem

    with small_filesystem(tmp_path / "mnt", "24m") as mnt:
        yield mnt


def test_full_disk_during_a_save_leaves_the_last_checkpoint_and_no_partial(small_disk, monkeypatch):
    job = small_disk / "job"
    save_checkpoint(_FakeAccelerator(8 << 20), job, Progress(step=2), keep_last=3)
    # the next save is estimated at 8 MB (the last checkpoint) but writes 20: the disk fills during the write
    with pytest.raises(diskspace.DiskFullError) as e:
        save_checkpoint(_FakeAccelerator(20 << 20), job, Progress(step=4), keep_last=3)
    msg = str(e.value)
    assert e.value.exit_code == 3 and msg.startswith(f"no space left on {job / 'checkpoints'}: a checkpoint needs ~8 MB")
    assert [p.name for p in (job / "checkpoints").iterdir()] == ["step-000002"]  # the .tmp is gone
    assert [p.name for p in list_complete(job)] == ["step-000002"]
    assert (job / "checkpoints/step-000002" / MARKER).is_file() and (job / "checkpoints/step-000002" / PROGRESS_FILE)
    # refused up front when the estimate does not fit: nothing is started
    (small_disk / "filler").write_bytes(b"\0" * (12 << 20))
    with pytest.raises(diskspace.DiskFullError, match=r"needs ~8 MB, \d MB free"):
        save_checkpoint(_FakeAccelerator(8 << 20), job, Progress(step=6), keep_last=3)
    assert [p.name for p in (job / "checkpoints").iterdir()] == ["step-000002"]


def test_hook_acts_only_inside_accelerate_launch():
    assert launch_hook._is_accelerate_launch(["/v/bin/accelerate", "launch", "x.py"], [])
    assert launch_hook._is_accelerate_launch(["/v/bin/accelerate-launch", "x.py"], [])
    assert launch_hook._is_accelerate_launch(["-m"], ["python", "-m", "accelerate.commands.launch", "x.py"])
    assert not launch_hook._is_accelerate_launch(["/v/bin/accelerate", "config"], [])
    assert not launch_hook._is_accelerate_launch(["launch/train.py"], ["python", "launch/train.py"])
    assert launch_hook.is_terrascale_script(SimpleNamespace(training_script=str(ROOT / "launch/train.py")))
    assert not launch_hook.is_terrascale_script(SimpleNamespace(training_script=__file__.replace("test_", "nope_")))
    assert launch_hook.shell_code(2) == 2 and launch_hook.shell_code(-9) == 137


def test_launcher_reports_the_first_failing_rank():
    f = lambda code, t: SimpleNamespace(exitcode=code, timestamp=t, pid=100 + t)  # noqa: E731
    assert launch_hook.first_failure_code({0: f(-15, 5), 1: f(2, 3)}) == (2, "")
    # same second (elastic's stamps are whole seconds): the rank elastic SIGTERMed is not the cause
    assert launch_hook.first_failure_code({0: f(-15, 3), 1: f(2, 3)}) == (2, "")
    assert launch_hook.first_failure_code({0: f(-15, 3), 1: f(-15, 3)})[0] == 143
    code, note = launch_hook.first_failure_code({0: f(1, 9), 1: f(-9, 4)})
    assert code == 137 and "rank 1 (pid 104) was killed by SIGKILL" in note


def test_install_writes_the_pth_once(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_hook, "pth_path", lambda: tmp_path / launch_hook.PTH_NAME)
    path = launch_hook.install()
    assert path.read_text() == launch_hook.PTH_LINE
    mtime = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert launch_hook.install().stat().st_mtime_ns == mtime


def test_full_disk_outside_a_save_is_one_clear_error_and_exit_3(small_disk, monkeypatch, capsys):
    """ENOSPC while the job's config is written (stop 20's CI: a traceback and exit 1) goes through the same exit
    code and kind of message as a full disk during a save, and leaves no config.yaml."""
    from trainer import cli
    from trainer.config import DEMO_CONFIG
    from trainer.train import run

    job = small_disk / "job"
    job.mkdir()
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the tmpfs to its last byte
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    monkeypatch.setattr(run, "main", lambda exp, stop: run.freeze_config(exp, job) or 0)
    code = cli.main(["train", "--config", str(DEMO_CONFIG), f"checkpoint.dir={job}"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"terrascale: error: no space left on device writing into {job}. A checkpoint counts only" in err
    assert "Traceback" not in err and not (job / "config.yaml").exists()
    # a command other than train, where the OS names the file (as a failed open does): that file, same exit code
    def stats(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(job / "stats.json"))

    monkeypatch.setattr(cli, "_stats", stats)
    assert cli.main(["stats", "--config", str(DEMO_CONFIG)]) == 3
    assert f"no space left on device writing {job / 'stats.json'}. " in capsys.readouterr().err
    # any other OSError is not hidden behind that message
    def denied(exp, stop):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(job / "config.yaml.tmp"))

    monkeypatch.setattr(run, "main", denied)
    with pytest.raises(PermissionError):
        cli.main(["train", "--config", str(DEMO_CONFIG), f"checkpoint.dir={job}"])
