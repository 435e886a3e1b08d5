"""A job dir on a real, small filesystem (a 80 MB tmpfs): the first checkpoint (~51 MB) fits, the second does not.
The run stops with one clear message and exit 3; the last complete checkpoint is intact, nothing partial remains.
(The same situation hit *during* a write, with ENOSPC from the kernel, is tests/unit/test_reliability.py.)"""
from __future__ import annotations


import pytest

from tests.integration.helpers import TINY, run_train, small_filesystem
from trainer.train.checkpoint import list_complete


@pytest.mark.slow
def test_full_disk_stops_with_a_clear_message(tmp_path):
    with small_filesystem(tmp_path / "small", "80m") as mnt:
        job = mnt / "job"
        r = run_train([*TINY, "run.max_steps=4", "run.eval_every=100", "memory.profile=full",
                       f"data.root={tmp_path / 'data'}", f"checkpoint.dir={job}"])
        assert r.returncode == 3, r.stderr[-4000:]
        assert f"no space left on {job / 'checkpoints'}: a checkpoint needs ~" in r.stderr
        assert "Traceback" not in r.stderr
        assert [p.name for p in (job / "checkpoints").iterdir()] == ["step-000002"]
        assert [p.name for p in list_complete(job)] == ["step-000002"]
