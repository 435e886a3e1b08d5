import pytest

from trainer.train.checkpoint import (MARKER, PROGRESS_FILE, Progress, checkpoint_name, find_resume, list_complete,
                                prune)
from trainer.errors import CheckpointError


def _make(job, step, complete=True, tmp=False):
    d = job / "checkpoints" / (checkpoint_name(step) + (".tmp" if tmp else ""))
    d.mkdir(parents=True)
    (d / PROGRESS_FILE).write_text(Progress(step=step).to_json())
    if complete:
        (d / MARKER).write_text("x")
    return d


def test_names_are_zero_padded():
    assert checkpoint_name(200) == "step-000200"


def test_only_complete_checkpoints_are_resumed(tmp_path):
    _make(tmp_path, 10)
    _make(tmp_path, 20)
    _make(tmp_path, 30, complete=False)  # killed before the marker
    _make(tmp_path, 40, tmp=True)  # killed before the rename
    assert [p.name for p in list_complete(tmp_path)] == ["step-000010", "step-000020"]
    assert find_resume(tmp_path, "auto").name == "step-000020"


def test_truncated_checkpoint_without_progress_is_skipped(tmp_path):
    good = _make(tmp_path, 5)
    bad = _make(tmp_path, 6)
    (bad / PROGRESS_FILE).unlink()
    assert find_resume(tmp_path, "auto") == good


def test_resume_auto_on_empty_job_starts_fresh(tmp_path):
    assert find_resume(tmp_path, "auto") is None


def test_resume_false_refuses_to_overwrite(tmp_path):
    _make(tmp_path, 10)
    with pytest.raises(CheckpointError, match="checkpoint.resume is false"):
        find_resume(tmp_path, False)


def test_resume_explicit_incomplete_path_is_refused(tmp_path):
    d = _make(tmp_path, 10, complete=False)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_resume(tmp_path, str(d))


def test_prune_keeps_last_n(tmp_path):
    for s in (10, 20, 30, 40):
        _make(tmp_path, s)
    removed = prune(tmp_path, 2)
    assert [p.name for p in removed] == ["step-000010", "step-000020"]
    assert [p.name for p in list_complete(tmp_path)] == ["step-000030", "step-000040"]


def test_frozen_weights_and_their_quant_state_are_dropped():
    import torch

    from trainer.train.checkpoint import drop_frozen_weights

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    state = dict(model.state_dict())
    state["0.weight.absmax"] = torch.ones(1)  # bitsandbytes keeps quantization state beside the weight
    drop_frozen_weights([model], [state], "unused")
    assert sorted(state) == ["0.bias", "1.bias", "1.weight"]
