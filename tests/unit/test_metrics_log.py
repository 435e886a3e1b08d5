"""metrics.jsonl keeps one record per step whatever the kills: trimmed to the resumed checkpoint on every start,
a torn last line tolerated and repaired."""
from __future__ import annotations

import json
import logging

from trainer.train.report import MetricsLog


def _log(tmp_path, steps, torn: str = "") -> MetricsLog:
    m = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for s in steps:
        m.append({"split": "train", "step": s, "loss": 1.0 / s})
        if s % 2 == 0:
            m.append({"split": "val", "step": s, "loss": 2.0 / s})
    if torn:
        with open(m.path, "a") as f:
            f.write(torn)
    return m


def _steps(m: MetricsLog, split: str = "train") -> list[int]:
    return [r["step"] for r in m.read() if r["split"] == split]


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    m = _log(tmp_path, range(1, 8))  # killed at step 7, newest checkpoint step 4
    m.resume_at(4)
    assert _steps(m) == [1, 2, 3, 4] and _steps(m, "val") == [2, 4]
    for s in range(5, 9):
        m.append({"split": "train", "step": s, "loss": 0.0})
    assert _steps(m) == list(range(1, 9))  # each step once


def test_fresh_start_keeps_nothing_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    m = _log(tmp_path, range(1, 4))
    m.resume_at(0)
    assert m.path.read_text() == "" and m.read() == []


def test_torn_last_line_is_tolerated_and_repaired(tmp_path, caplog):
    m = _log(tmp_path, range(1, 5), torn='{"split": "train", "step": 5, "lo')
    assert _steps(m) == [1, 2, 3, 4]  # a reader (curves, tests) never crashes on it
    with caplog.at_level(logging.INFO, logger="trainer.train.report"):
        m.resume_at(4)
    assert "torn last line" in caplog.text
    text = m.path.read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    m.append({"split": "train", "step": 5, "loss": 0.5})
    assert _steps(m) == [1, 2, 3, 4, 5]


def test_torn_line_that_happens_to_end_in_a_newline_and_damage_in_the_middle(tmp_path, caplog):
    m = _log(tmp_path, [1, 2], torn='{"split": "tr\n')
    assert _steps(m) == [1, 2]
    with open(m.path, "a") as f:
        f.write('{"split": "train", "step": 3, "loss": 0.3}\n')
    with caplog.at_level(logging.WARNING, logger="trainer.train.report"):
        m.resume_at(3)
    assert "line 4 is not a JSON record" in caplog.text and str(m.path) in caplog.text
    assert _steps(m) == [1, 2, 3]


def test_disabled_on_other_ranks_and_missing_file(tmp_path):
    other = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    other.append({"split": "train", "step": 1})
    other.resume_at(0)
    assert not other.path.exists() and other.read() == []
    MetricsLog(tmp_path / "metrics.jsonl", enabled=True).resume_at(3)  # nothing to trim: no file made
    assert not (tmp_path / "metrics.jsonl").exists()
