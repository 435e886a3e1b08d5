"""Resume never runs code planted in a job dir: every pickle-format file of a checkpoint (no DeepSpeed, ZeRO-3) is
replaced by a pickle whose loading would create a marker file; resume refuses it with a clear error, and the
files Accelerate would have unpickled but terrascale no longer reads are ignored."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import TINY, check, metrics, run_train

# Accelerate's pickled RNG state, which terrascale no longer writes: a planted one must be ignored. (A planted
# custom_checkpoint_0.pkl is refused by name before anything is read: tests/unit/test_reliability.py.)
LEGACY = ["random_states_0.pkl"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def is_pickle_format(f: Path) -> bool:
    if f.suffix in (".safetensors", ".json", ".py", ".yaml") or f.name in ("latest", "COMPLETE"):
        return False
    if zipfile.is_zipfile(f):
        return any(n.endswith("data.pkl") for n in zipfile.ZipFile(f).namelist())
    return f.read_bytes()[:1] == b"\x80"


def plant(step: Path, marker: Path, everywhere: bool) -> list[str]:
    targets = [f for f in step.rglob("*") if f.is_file() and is_pickle_format(f)] if everywhere else []
    targets += [step / name for name in LEGACY]
    for f in targets:
        torch.save({"state": _Payload(marker)}, f)
    return sorted(str(f.relative_to(step)) for f in targets)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["full", "zero3_offload"])
def test_planted_pickles_never_run(tmp_path, profile):
    job, marker = tmp_path / "job", tmp_path / "PWNED"
    args = [*TINY, "run.max_steps=4", "checkpoint.export=false", f"memory.profile={profile}",
            f"data.root={tmp_path / 'data'}", f"checkpoint.dir={job}"]
    check(run_train([*args, "run.stop_at_step=2"]))
    step = job / "checkpoints" / "step-000002"
    assert not list(step.rglob("*.pkl")), "training state must not be written as pickle"
    clean = tmp_path / "clean"
    shutil.copytree(step, clean)

    # the payload is live: an unsafe load of a planted file does run it
    probe = tmp_path / "probe.pt"
    torch.save({"state": _Payload(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    planted = plant(step, marker, everywhere=True)
    expected = {"full": {"optimizer.bin"}, "zero3_offload": {"pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
                                                             "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"}}
    assert expected[profile] | set(LEGACY) <= set(planted), planted
    r = run_train(args)
    assert not marker.exists(), "a planted pickle ran during resume"
    assert r.returncode == 1, r.stderr[-4000:]
    assert "is not plain tensor data and was not loaded" in r.stderr and "Traceback" not in r.stderr

    if profile == "full":  # the files resume does not read are ignored: it resumes and finishes
        shutil.rmtree(step)
        shutil.copytree(clean, step)
        plant(step, marker, everywhere=False)
        r = check(run_train(args))
        assert "resumed from" in r.stderr and not marker.exists()
        assert [m["step"] for m in metrics(job)] == [1, 2, 3, 4]
