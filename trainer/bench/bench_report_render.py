"""The benchmark report as a markdown table and a PNG chart (throughput; measured vs planned memory)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _ratio(measured: float | None, planned: float | None) -> str:
    if not measured or not planned:
        return "—"
    return f"{planned / measured:.2f}"


def markdown(report: dict[str, Any]) -> str:
    rows = report["results"]
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    lines = [
        "# Benchmark report",
        "",
        f"Config `{report['config']}` {' '.join(report['overrides'])}; {report['warmup']} warm-up + "
        f"{report['steps']} timed steps per combination, {report['processes']} process(es), on {device} "
        f"({report['machine']}).",
        "",
        "Throughput: samples per second over the timed steps, all processes. Peak device: the CUDA allocator's "
        "peak on a GPU; on a CPU, tracked tensors. Tracked tensors: torch MemTracker's peak over one steady-state "
        "step (what the planner predicts). Planned: the memory planner for the same config and device; "
        "planned/measured compares it with the peak device memory.",
        "",
        "| backbone | profile | samples/s | peak device MiB | tracked tensors MiB | peak RSS MiB | planned device MiB "
        "| planned/measured | planned CPU MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"failed (exit {r.get('exit_code')})"
        lines.append(" | ".join([
            f"| {r['backbone']}", r["profile"], _f(r.get("samples_per_s")), _f(r.get("peak_device_mb")),
            _f(r.get("tracked_peak_mb")), _f(r.get("peak_rss_mb")), _f(r.get("planned_device_mb")),
            _ratio(r.get("peak_device_mb"), r.get("planned_device_mb")), _f(r.get("planned_cpu_mb")),
            f"{status} |"]))
    for r in rows:
        if r["status"] != "ok":
            lines += ["", f"## {r['backbone']} × {r['profile']}: failed", "", "```", r.get("error", ""), "```"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['backbone']}\n{r['profile']}" for r in rows]
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 4), 4.2))
    ax1.bar(x, [r.get("samples_per_s") or 0 for r in rows], color="tab:blue")
    ax1.set_ylabel("samples / s (steady state)")
    ax1.set_title("throughput")
    w = 0.38
    ax2.bar([i - w / 2 for i in x], [r.get("peak_device_mb") or 0 for r in rows], w, label="measured peak",
            color="tab:orange")
    ax2.bar([i + w / 2 for i in x], [r.get("planned_device_mb") or 0 for r in rows], w, label="planned",
            color="tab:gray")
    ax2.set_ylabel("MiB")
    ax2.set_title("peak device memory")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax1.text(i, 0, "failed", ha="center", va="bottom", color="tab:red")
    fig.tight_layout()
    from trainer.train.report import save_figure

    return save_figure(fig, out, dpi=110)
