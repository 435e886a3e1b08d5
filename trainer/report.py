"""Metrics on disk: `metrics.jsonl` (append-only, rank 0) and the loss/metric curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint, so the log equals a straight run."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
