"""config.yaml survives kills: a fresh start rewrites it (a kill may have cut it), a resume keeps the original."""
from __future__ import annotations

from trainer.config import Experiment
from trainer.train.run import freeze_config


def test_fresh_start_rewrites_a_cut_config_and_resume_keeps_the_original(tmp_path):
    exp = Experiment.model_validate({})
    (tmp_path / "config.yaml").write_text("name: dem")  # killed while writing it, before any checkpoint
    freeze_config(exp, tmp_path, fresh=True)
    first = (tmp_path / "config.yaml").read_text()
    assert first.startswith("name:") and len(first) > 200 and not (tmp_path / "config.resumed.yaml").exists()
    changed = exp.model_copy(update={"name": "other"})
    freeze_config(changed, tmp_path, fresh=False)
    assert (tmp_path / "config.yaml").read_text() == first
    assert "other" in (tmp_path / "config.resumed.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.resumed.yaml", "config.yaml"]
