"""Universal-checkpoint bookkeeping (the conversion and the load themselves run in tests/integration/test_multinode.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.errors import CheckpointError
from trainer.train.checkpoint import Progress
from trainer.train.universal import convert, needs_universal, rescale_progress, with_load_universal


def _step(root: Path, world: int, shards: bool = True, converted: bool = False) -> Path:
    step = root / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "progress.json").write_text(json.dumps({"step": 4, "epoch": 0, "batch_in_epoch": 4, "samples_seen": 32,
                                                    "world_size": world}))
    (step / "COMPLETE").write_text("step-000004\n")
    if shards:
        (step / "pytorch_model").mkdir()
        for r in range(world):
            (step / "pytorch_model" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    if converted:
        (step / "universal").mkdir()
        (step / "universal" / "COMPLETE").write_text("x")
    return step


@pytest.mark.parametrize("batch,old,new,gas,want", [
    (3, 2, 1, 1, 6),   # 6 micro-batches of this epoch consumed; one rank now takes them all
    (4, 1, 2, 1, 2),
    (3, 1, 2, 1, 1),   # 3 over 2 ranks: 1 each, the third is seen again
    (6, 1, 2, 2, 2),   # whole optimizer steps only: 3 per rank rounds down to 2 with grad_accum 2
    (4, 2, 4, 2, 2),
])
def test_rescale_progress_keeps_the_data_position(batch, old, new, gas, want):
    p = Progress(step=7, epoch=2, batch_in_epoch=batch, samples_seen=123, world_size=old)
    q = rescale_progress(p, new, gas)
    assert (q.step, q.epoch, q.samples_seen, q.world_size, q.batch_in_epoch) == (7, 2, 123, new, want)
    assert q.batch_in_epoch % gas == 0 and q.batch_in_epoch * new <= batch * old


def test_needs_universal(tmp_path):
    assert needs_universal(None, 2) is False
    same = _step(tmp_path / "a", world=2)
    assert needs_universal(same, 2) is False
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) but this run has 1; convert it first: "
                                              r"`terrascale universal .*step-000004`"):
        needs_universal(same, 1)
    assert needs_universal(_step(tmp_path / "b", world=2, converted=True), 1) is True
    with pytest.raises(CheckpointError, match=r"resume with 2 process\(es\)"):
        needs_universal(_step(tmp_path / "c", world=2, shards=False), 1)


def test_with_load_universal_sets_only_that():
    cfg = {"zero_optimization": {"stage": 3}, "checkpoint": {"tag_validation": "Warn"}}
    out = with_load_universal(cfg)
    assert out["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert "load_universal" not in cfg.get("checkpoint", {}) and out["zero_optimization"] == {"stage": 3}
    with pytest.raises(CheckpointError, match="only be loaded under DeepSpeed"):
        with_load_universal(None)


def test_convert_refuses_what_it_cannot_convert(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nope")
    incomplete = _step(tmp_path / "a", world=2)
    (incomplete / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        convert(incomplete)
    with pytest.raises(CheckpointError, match="written without DeepSpeed"):
        convert(_step(tmp_path / "b", world=2, shards=False))
