"""The README's fit table is the planner's output (docs/fit_table.md), not typed: the two must agree."""
from __future__ import annotations

import pytest

from trainer.errors import ConfigError
from trainer.plan.fit_table import README_END, README_START, readme_section, update_readme


def test_readme_fit_table_is_the_generated_one(root):
    readme = (root / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    expected = readme_section((root / "docs" / "fit_table.md").read_text())
    assert block == expected, ("README fit table differs from docs/fit_table.md: run "
                               "python launch/plan.py --fit-table docs/fit_table.md --readme README.md")
    # the 26-40B rows are there, and each says what fits the GPU
    for name in ("internvl2_26b", "internvl2_40b", "gemma3_27b"):
        assert f"| {name} | full |" in block and f"**{name} (full)**" in block


TABLE = "# Fit table\n\nintro\n\n## Summary: fastest\n\n| a | b |\n\n## Backbones of 20B\n\n- x\n\n## Per backbone\n\nlots\n"


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    update_readme(readme, TABLE)
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{README_END}\n\nafter\n")
    assert "old table" not in text and "lots" not in text
    assert f"{README_START}\n### Summary: fastest\n\n| a | b |\n\n### Backbones of 20B\n\n- x\n{README_END}" in text
    update_readme(readme, TABLE)  # idempotent
    assert readme.read_text() == text


def test_readme_without_markers_is_refused_before_planning(tmp_path, monkeypatch):
    from trainer.plan import fit_table
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    monkeypatch.setattr(fit_table, "plan_experiment", lambda *a, **k: pytest.fail("planned before checking"))
    with pytest.raises(ConfigError, match=r"--readme .*README.md: no fit-table markers"):
        fit_table.write_fit_table(tmp_path / "fit.md", readme=readme)
    with pytest.raises(ConfigError, match="no such file"):
        fit_table.write_fit_table(tmp_path / "fit.md", readme=tmp_path / "missing.md")
    assert readme.read_text() == "# no markers\n" and not (tmp_path / "fit.md").exists()


def test_readme_flag_needs_fit_table(capsys):
    from trainer.cli import main

    assert main(["plan", "--readme", "README.md"]) == 2
    assert "--readme goes with --fit-table" in capsys.readouterr().err
