"""`bench compare`: the same task and data over a list of backbones, frozen-backbone probe and LoRA, one report.

    python launch/bench.py compare --config launch/configs/compare/forest_tiny.yaml [key=value ...]

The spec file holds one `compare:` section (`CompareSpec`). Every (backbone, method) is a job of the sweep
machinery (`trainer.sweep.sweep.run_sweep`: resumable, skips finished jobs, records failures and goes on) in
`<dir>/jobs/`, with the spec's common overrides and the command line's last, so every job trains on the same
task and data. Methods: `probe` = `model.freeze_backbone=true memory.profile=full` (only neck, decoder and head
train), `lora` = `memory.profile=lora`. After training, each finished job predicts a scene through the predict
benchmark (`trainer.bench.bench_predict.measure_job`, a fresh process).

Written to `<dir>/`: `compare.md` (the table, headed by where it ran and what the numbers mean there),
`compare.csv`, `compare.json`, `compare.png` (one chart, four panels). Columns: validation metric, trainable
parameters (from the run's own log line), planned and measured training memory (`sweep_summary`), training
samples/s, inference windows/s and peak RSS, and the planner's GPU bound for inference.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.errors import ConfigError

METHODS = {"probe": {"model.freeze_backbone": True, "memory.profile": "full"},
           "lora": {"memory.profile": "lora"}}
TRAINABLE = re.compile(r"profile (\S+): ([0-9.]+)M of ([0-9.]+)M parameters trainable")


class BackboneEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str                                         # the row's label
    config: str                                       # the experiment YAML of this backbone (necks, kwargs)
    overrides: dict[str, Any] = Field(default_factory=dict)


class PredictSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    windows: int = Field(8, ge=2)
    window_batch: int = Field(4, ge=1)


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backbones: list[BackboneEntry] = Field(min_length=1)
    methods: list[str] = Field(default_factory=lambda: ["probe", "lora"], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)  # every job: the same task and data
    dir: str = "runs/compare"
    predict: PredictSettings = PredictSettings()


def load_spec(path: Path) -> CompareSpec:
    from trainer.config import format_validation_error, read_yaml

    raw = read_yaml(path)
    if set(raw) != {"compare"}:
        raise ConfigError([f"{k}: a compare file holds only the `compare:` section" for k in sorted(set(raw) - {"compare"})]
                          or ["compare: missing; the file needs one `compare:` section (see --help)"], source=str(path))
    try:
        spec = CompareSpec.model_validate(raw["compare"])
    except ValidationError as e:
        raise ConfigError([f"compare.{i}" for i in format_validation_error(e, CompareSpec)], source=str(path)) from None
    bad = [m for m in spec.methods if m not in METHODS]
    issues = [f"compare.methods: {m!r} is not a method; choose from {', '.join(METHODS)}" for m in bad]
    issues += [f"compare.backbones.{i}.config: {b.config} does not exist" for i, b in enumerate(spec.backbones)
               if not _resolve(b.config, path).is_file()]
    names = [b.name for b in spec.backbones]
    issues += [f"compare.backbones: name {n!r} appears twice; names label the rows" for n in set(names)
               if names.count(n) > 1]
    if issues:
        raise ConfigError(issues, source=str(path))
    return spec


def _resolve(config: str, spec_path: Path) -> Path:
    p = Path(config)
    if not p.is_absolute() and not p.is_file() and (spec_path.parent / p).is_file():
        return spec_path.parent / p
    return p


def build_sweep(spec: CompareSpec, spec_path: Path, cli_overrides: list[str]):
    from trainer.sweep.sweep import JobSpec, Launcher, Sweep, override

    root = Path(spec.dir)
    common = [override(k, v) for k, v in spec.overrides.items()]
    jobs = []
    for b in spec.backbones:
        for m in spec.methods:
            ovr = [*common, *(override(k, v) for k, v in b.overrides.items()),
                   *(override(k, v) for k, v in METHODS[m].items()), *cli_overrides]
            jobs.append(JobSpec(f"{b.name}-{m}", str(_resolve(b.config, spec_path)), tuple(ovr),
                                (("backbone", b.name), ("method", m))))
    return Sweep(root / "jobs", tuple(jobs), Launcher())


def trainable_params(job_dir: Path) -> tuple[float | None, float | None]:
    """(trainable, total) millions of parameters, from the run's own log line (trainer.model.fitting.apply_profile)."""
    for name in ("sweep.stderr.log", "sweep.stdout.log"):
        path = job_dir / name
        if path.is_file():
            hits = TRAINABLE.findall(path.read_text(errors="replace"))
            if hits:
                return float(hits[-1][1]), float(hits[-1][2])
    return None, None


def run_compare(spec_path: Path, cli_overrides: list[str], echo=print) -> dict[str, Any]:
    from tqdm import tqdm

    from trainer.bench import bench_predict
    from trainer.runtime import cuda_available
    from trainer.sweep.sweep import JobResult, read_state, run_sweep
    from trainer.sweep.sweep_summary import PRIMARY, job_row

    spec = load_spec(spec_path)
    sweep = build_sweep(spec, spec_path, cli_overrides)
    echo(f"[compare] {len(sweep.jobs)} jobs ({len(spec.backbones)} backbones x {', '.join(spec.methods)}) in "
         f"{sweep.dir}")
    run_sweep(sweep, echo=echo)
    results = read_state(sweep.dir)
    # stopped by a signal (the running job saved a checkpoint): no predictions now; the same command continues
    stopped = any(r.status == "interrupted" for r in results.values())
    rows = []
    for job in tqdm(sweep.jobs, desc="compare: predict", unit="job"):
        job_dir = sweep.dir / job.name
        base = job_row(job.name, job.axes, results.get(job.name) or JobResult(job.name), job_dir)
        metric = next((f"val_{m}" for m in PRIMARY if f"val_{m}" in base), None)
        trainable, total = trainable_params(job_dir)
        row = {"backbone": dict(job.axes)["backbone"], "method": dict(job.axes)["method"], "status": base["status"],
               "metric": metric.removeprefix("val_") if metric else None, "val_metric": base.get(metric),
               "trainable_m": trainable, "total_m": total, "steps": base["step"],
               "train_samples_per_s": base["samples_per_s"], "planned_train_mb": base["planned_peak_mb"],
               "measured_train_mb": base["observed_peak_mb"], "measured_source": base["observed_source"],
               "error": base["error"][-400:] if base["error"] else ""}
        if base["status"] == "done" and not stopped:
            p = bench_predict.measure_job(job_dir, sweep.dir.parent / "predict" / job.name, spec.predict.windows,
                                          spec.predict.window_batch)
            if p["status"] == "ok":
                row.update(predict_windows_per_s=p["windows_per_s"], predict_peak_rss_mb=p["peak_rss_mb"],
                           tile=p["tile"])
                plan = bench_predict.planned(job_dir, spec.predict.window_batch)
                row.update(planned_predict_cpu_mb=plan["planned_cpu_mb"],
                           gpu_bound_windows_per_s_bf16=plan["gpu_bound_windows_per_s"].get("bf16"),
                           gpu_max_windows_nf4=plan["gpu_max_windows_24gb"].get("nf4"))
            else:
                row["error"] = f"predict failed (exit {p.get('exit_code')}): {p.get('error', '')[-300:]}"
        rows.append(row)
    tiny = any("tiny" in json.dumps(b.overrides) or "tiny" in b.name for b in spec.backbones)
    doc = {"schema": "terrascale.compare/1", "spec": str(spec_path), "overrides": cli_overrides,
           "device": "cuda" if cuda_available() else "cpu", "tiny": tiny,
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "predict": spec.predict.model_dump(),
           "rows": rows}
    write_report(doc, Path(spec.dir))
    return doc


def caveat(doc: dict[str, Any]) -> str:
    if doc["device"] == "cpu" or doc["tiny"]:
        where = "on a CPU host" if doc["device"] == "cpu" else "on a GPU host"
        what = "with the tiny random variants of the backbones" if doc["tiny"] else "with the given backbones"
        return (f"**Ran {where} {what}, for a few steps: the metrics only prove the pipeline** (every backbone, "
                "both methods, trained, evaluated, exported, predicted); they say nothing about which backbone "
                "is better. Memory and speed are this host's. On a GPU host with real checkpoints the same "
                "command gives the comparison.")
    return "Ran on a GPU host with the given checkpoints."


def _f(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "—"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


COLUMNS = [("backbone", "backbone"), ("method", "method"), ("status", "status"), ("val_metric", "val {metric}"),
           ("trainable_m", "trainable M params"), ("total_m", "total M params"), ("planned_train_mb", "planned train MiB"),
           ("measured_train_mb", "measured train MiB"), ("train_samples_per_s", "train samples/s"),
           ("predict_windows_per_s", "predict windows/s"), ("predict_peak_rss_mb", "predict peak RSS MiB"),
           ("planned_predict_cpu_mb", "planned predict MiB"),
           ("gpu_bound_windows_per_s_bf16", "GPU bound windows/s (bf16)")]


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    src = next((r["measured_source"] for r in rows if r.get("measured_source")), "")
    lines = ["# Backbone comparison", "", caveat(doc), "",
             f"`python launch/bench.py compare --config {doc['spec']}"
             + (" " + " ".join(doc["overrides"]) if doc["overrides"] else "") + f"` on {doc['device']} "
             f"({doc['machine']}). probe = frozen backbone (neck, decoder, head train); lora = memory.profile lora. "
             f"Measured train memory: {src or 'the job log'} (peak_rss_mb: the training process's RSS on a CPU host, "
             "peak_gpu_mb: the CUDA allocator on a GPU); planned train memory: the planner's device estimate for "
             "that run. Predict: "
             f"{doc['predict']['windows']} windows, {doc['predict']['window_batch']} per batch, through "
             "`bench predict`; the GPU bound is the planner's windows/s at 165.2 TFLOPS bf16.", "",
             "| " + " | ".join(h.format(metric=metric) for _, h in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_f(r.get(k)) for k, _ in COLUMNS) + " |")
    for r in rows:
        if r.get("error"):
            lines += ["", f"- {r['backbone']} {r['method']}: {r['error'].splitlines()[-1] if r['error'] else ''}"]
    return "\n".join(lines) + "\n"


def to_csv(doc: dict[str, Any]) -> str:
    cols: list[str] = []
    for r in doc["rows"]:
        cols += [k for k in r if k not in cols]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols)
    w.writeheader()
    for r in doc["rows"]:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    return out.getvalue()


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = [f"{r['backbone']}\n{r['method']}" for r in rows]
    x = list(range(len(rows)))
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    fig, axes = plt.subplots(2, 2, figsize=(max(9, 1.6 * len(rows) + 4), 7.5))
    (a, b), (c, d) = axes
    colors = ["tab:blue" if r["method"] == "probe" else "tab:orange" for r in rows]
    a.bar(x, [r.get("val_metric") or 0 for r in rows], color=colors)
    a.set_title(f"validation {metric}")
    b.bar(x, [r.get("trainable_m") or 0 for r in rows], color=colors)
    b.set_yscale("log")
    b.set_title("trainable parameters (M, log)")
    w = 0.38
    c.bar([i - w / 2 for i in x], [r.get("planned_train_mb") or 0 for r in rows], w, color="tab:gray", label="planned")
    c.bar([i + w / 2 for i in x], [r.get("measured_train_mb") or 0 for r in rows], w, color="tab:green",
          label="measured")
    c.set_title("training memory (MiB)")
    c.legend(fontsize=8)
    d.bar([i - w / 2 for i in x], [r.get("train_samples_per_s") or 0 for r in rows], w, color="tab:purple",
          label="train samples/s")
    d.bar([i + w / 2 for i in x], [r.get("predict_windows_per_s") or 0 for r in rows], w, color="tab:red",
          label="predict windows/s")
    d.set_title("speed on this host")
    d.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
    for i, r in enumerate(rows):
        if r["status"] != "done":
            a.text(i, 0, r["status"], ha="center", va="bottom", color="tab:red", fontsize=8)
    fig.suptitle(caveat(doc).split(":")[0].replace("*", "") if doc["device"] == "cpu" or doc["tiny"] else
                 "Backbone comparison", fontsize=9)
    fig.tight_layout()
    from trainer.train.report import save_figure

    return save_figure(fig, path, dpi=100)


def write_report(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.json", out / "compare.md", out / "compare.csv", out / "compare.png"]
    paths[0].write_text(json.dumps(doc, indent=2))
    paths[1].write_text(markdown(doc))
    paths[2].write_text(to_csv(doc))
    plot(doc, paths[3])
    return paths
