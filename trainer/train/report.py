"""Metrics on disk: `metrics.jsonl` (append-only, rank 0) and the loss/metric curve PNG."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# per-class metrics (TerraTorch's IoU_<class>, Class_Accuracy_<class>; earlier releases' names after them): the
# logs keep them, summaries and the progress line leave them out
PER_CLASS = ("IoU_", "Class_Accuracy_", "f1_class", "precision_", "recall_", "iou_class")


class MetricsLog:
    """One JSON record per line, appended by rank 0; exactly one record per (split, step) whatever the kills.

    A run killed after its last checkpoint has logged steps the resumed run logs again, and a `kill -9` in the
    middle of a write leaves a torn last line: `resume_at` is called on every start and keeps only the whole
    records up to the checkpoint being resumed (none on a fresh start)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def resume_at(self, step: int) -> None:
        """Trim the log to the records of steps <= `step` (0: a fresh start, nothing kept), atomically."""
        if not (self.enabled and self.path.exists()):
            return
        records, torn = parse_records(self.path.read_text(errors="replace"), self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        dropped = len(records) - len(kept)
        if dropped or torn:
            log.info("%s: dropped %d record(s) after step %d%s, written by an interrupted run", self.path, dropped,
                     step, " and a torn last line" if torn else "")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")  # one write per record: a kill tears at most the last line

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return parse_records(self.path.read_text(errors="replace"), self.path)[0]


def parse_records(text: str, source: Path) -> tuple[list[dict], bool]:
    """The whole records of a metrics log, and whether its last line was torn (cut by a kill mid-write: no
    newline, or not JSON). A damaged line before the last is not a kill's doing: it is dropped with a warning
    naming the file and line, so a resume never crashes on its own log."""
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline; otherwise a line cut mid-write
    torn = bool(tail.strip())
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines) and not torn:
            torn = True
        else:
            log.warning("%s line %d is not a JSON record; skipped", source, number)
    return records, torn


def plot_curves(records: list[dict], out: Path, primary: str) -> Path | None:
    """Train loss, val loss and the task's primary validation metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    if val and primary in val[0]:
        axes[1].plot([r["step"] for r in val], [r[primary] for r in val], "o-", color="tab:green")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"val {primary}")
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def save_figure(fig, out: Path, dpi: int | None = None) -> Path:
    """Write `fig` as a PNG under a temporary name, rename it into place, and close it: a reader never sees a
    half-written image, and a failed save leaves nothing behind."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
