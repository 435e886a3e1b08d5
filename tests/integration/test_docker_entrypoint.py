"""docker/entrypoint.sh outside a container: no Docker engine exists here, so the script the image runs is run
directly, with the venv's `accelerate` and the shipped CPU Accelerate config in place of the image's defaults.

What `docker run --restart on-failure` relies on: the entrypoint appends `checkpoint.resume=auto`; SIGTERM (what
`docker stop` and a host shutdown send to PID 1) reaches the training process through `accelerate launch`, which
saves a checkpoint, and the container then exits 143 (a "failure" Docker restarts after a reboot); the same
command continues from that checkpoint and exits 0 when the job is done.
"""
from __future__ import annotations

import signal
import subprocess

import pytest

from tests.integration.helpers import BIN, ROOT, TINY, env, metrics, start_until_training

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _env() -> dict[str, str]:
    e = env()
    e["TERRASCALE_ACCELERATE"] = str(BIN / "accelerate")
    e["TERRASCALE_ACCELERATE_CONFIG"] = str(ROOT / "launch/configs/accelerate/cpu.yaml")
    e["TERRASCALE_CLI"] = str(BIN / "terrascale")
    return e


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_same_command_resumes(tmp_path):
    job = tmp_path / "job"
    args = ["bash", str(ENTRYPOINT), "--config", "launch/configs/demo.yaml", *TINY, f"data.root={tmp_path / 'data'}",
            "memory.profile=full", "run.max_steps=30", "run.checkpoint_every=100", "run.eval_every=100",
            f"checkpoint.dir={job}"]
    proc = start_until_training(args, job, tmp_path, _env(), timeout=300)
    proc.send_signal(signal.SIGTERM)  # to the entrypoint only, as tini (PID 1 in the image) passes it on
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-4000:]
    assert "stopped by SIGTERM" in err and "checkpoint saved" in err
    saved = sorted((job / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name != "step-000030", [p.name for p in saved]

    r = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and saved[0].name in r.stderr
    assert [x["step"] for x in metrics(job)] == list(range(1, 31))
    assert (job / "export" / "model.safetensors").is_file()

    # a crash is a non-zero exit, which is what makes Docker restart the container
    r = subprocess.run([*args, "run.max_steps=0"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "run.max_steps" in r.stderr


def test_a_command_word_runs_that_terrascale_command(tmp_path):
    r = subprocess.run(["bash", str(ENTRYPOINT), "stats", "--help"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage: terrascale stats" in r.stdout
