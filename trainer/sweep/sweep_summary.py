"""A sweep's summary: one row per job, from its `metrics.jsonl` and the sweep's record of running it.

    <sweep dir>/summary.csv   every column (axes, final train/val metrics, memory, time, error)
    <sweep dir>/summary.md    the columns a person compares, as a table, then each failed job's error

Memory, planned vs observed:
- planned: the memory planner's device peak and CPU RAM need for the job's config (`trainer.sweep.sweep.planned_memory`;
  on a host without CUDA, the planner's prediction for a CPU run);
- observed: the peak the job logged in `metrics.jsonl`: the GPU allocator's (`peak_gpu_mb`) on a GPU, else the
  training process's peak RSS (`peak_rss_mb`; `peak_mem_mb` if a record carries it), rank 0;
- tree RSS: the sum over every process of the job (launcher and all ranks), sampled twice a second by the sweep.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.train.report import PER_CLASS

# the task's headline metric as the TerraTorch tasks log it (trainer.model.terratorch_task.primary_metric: mIoU for
# segmentation, the change class's F1_Score, RMSE), then the names of jobs from releases before them
PRIMARY = ("mIoU", "F1_Score", "RMSE", "miou", "f1", "rmse")


@dataclass
class JobResult:
    name: str
    status: str = "pending"  # pending | done | failed | interrupted
    exit_code: int | None = None
    attempts: int = 0
    seconds: float = 0.0  # all attempts
    tree_peak_rss_mb: float | None = None  # every process of the job, sampled twice a second
    planned_peak_mb: float | None = None  # the device (GPU; the CPU itself on a host without one)
    planned_cpu_mb: float | None = None
    note: str = ""
    error: str = ""
    command: list[str] = field(default_factory=list)


def read_metrics(job_dir: Path) -> list[dict]:
    path = job_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write: the rest still counts
            continue
    return out


def observed_peak_mb(records: list[dict]) -> tuple[float | None, str]:
    """(peak MiB, which measure) from the job's own records; the GPU allocator wins when present."""
    for key in ("peak_gpu_mb", "peak_mem_mb", "peak_rss_mb"):
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            return max(values), key
    return None, ""


def job_row(name: str, axes: tuple, result: Any, job_dir: Path) -> dict[str, Any]:
    records = read_metrics(job_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    row: dict[str, Any] = {"job": name, **{k: v for k, v in axes}, "status": result.status,
                           "exit_code": result.exit_code, "attempts": result.attempts,
                           "seconds": round(result.seconds, 1), "step": train[-1]["step"] if train else None,
                           "train_loss": train[-1]["loss"] if train else None}
    speeds = [r["samples_per_s"] for r in train[1:] if isinstance(r.get("samples_per_s"), (int, float))]
    row["samples_per_s"] = round(statistics.median(speeds), 3) if speeds else None
    if val:
        for k, v in val[-1].items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch") and not k.startswith(PER_CLASS):
                row[f"val_{k}"] = v
    peak, source = observed_peak_mb(train)
    row.update(planned_peak_mb=result.planned_peak_mb, planned_cpu_mb=result.planned_cpu_mb, observed_peak_mb=peak, observed_source=source,
               tree_peak_rss_mb=result.tree_peak_rss_mb, note=result.note, error=result.error)
    return row


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v).replace("|", "\\|")


def _first_error_line(error: str) -> str:
    lines = [line for line in error.splitlines() if line.strip()]
    errs = [line for line in lines if "error" in line.lower()]
    return (errs[-1] if errs else lines[-1] if lines else "")[:120]


def render_markdown(rows: list[dict], axis_keys: list[str], title: str) -> str:
    primary = next((f"val_{m}" for m in PRIMARY if any(f"val_{m}" in r for r in rows)), None)
    cols = ["job", *axis_keys, "status", "step", "train_loss", "val_loss", *([primary] if primary else []),
            "samples_per_s", "planned_peak_mb", "planned_cpu_mb", "observed_peak_mb", "tree_peak_rss_mb", "seconds"]
    heads = {"train_loss": "train loss", "val_loss": "val loss", "samples_per_s": "samples/s",
             "planned_peak_mb": "planned device MiB", "planned_cpu_mb": "planned CPU MiB",
             "observed_peak_mb": "observed MiB", "tree_peak_rss_mb": "all procs RSS MiB",
             "seconds": "time s"}
    out = io.StringIO()
    out.write(f"# Sweep {title}\n\n")
    out.write("| " + " | ".join(heads.get(c, c.removeprefix("val_") if c == primary else c) for c in cols)
              + " | note |\n")
    out.write("|" + "---|" * (len(cols) + 1) + "\n")
    for r in rows:
        note = _first_error_line(r["error"]) if r["status"] == "failed" else r.get("note", "")
        if r.get("observed_source") and r["observed_source"] != "peak_gpu_mb":
            note = f"observed = {r['observed_source']}" + (f"; {note}" if note else "")
        out.write("| " + " | ".join(_fmt(r.get(c)) for c in cols) + f" | {_fmt(note)} |\n")
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        out.write(f"\n## {r['job']}: failed (exit code {r['exit_code']})\n\n```\n{r['error']}\n```\n")
    return out.getvalue()


def render_csv(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out.getvalue()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(sweep, results: dict) -> tuple[Path, Path]:
    axis_keys: list[str] = []
    for job in sweep.jobs:
        axis_keys += [k for k, _ in job.axes if k not in axis_keys]
    rows = [job_row(j.name, j.axes, results.get(j.name) or JobResult(j.name), sweep.dir / j.name) for j in sweep.jobs]
    md, csv_path = sweep.dir / "summary.md", sweep.dir / "summary.csv"
    _write(md, render_markdown(rows, axis_keys, str(sweep.dir)))
    _write(csv_path, render_csv(rows))
    return md, csv_path
