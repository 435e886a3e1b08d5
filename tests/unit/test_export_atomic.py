"""The export directory is replaced by renames only: old or new, whole, never a mix."""
from __future__ import annotations

from trainer.train.export import _swap_into_place


def test_swap_replaces_a_previous_export_and_leaves_nothing_behind(tmp_path):
    out, tmp = tmp_path / "export", tmp_path / "export.tmp"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / "stale.txt").write_text("from the old export")
    (tmp_path / "export.old").mkdir()  # left by a run killed between the two renames
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    _swap_into_place(tmp, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "new"
