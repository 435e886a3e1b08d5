"""Planner benchmark: wall time and peak RSS of `launch/plan.py` for every catalog backbone's representative
experiment (the fit table's) and every shipped experiment config, each in a fresh process so the numbers are what
a user's command costs.

- warm: a fresh user cache, the shipped seed (`plan_cache_seed.json`) answers: the fast path;
- cold: nothing cached, seed off: counts, every trace and the decoder measurement (TerraTorch import) run.

`launch/bench.py planner` calls `run(out)`; results go to `bench_results/planner.json`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _one(config: Path, cache: Path, seed: bool) -> dict:
    env = {**os.environ, "TERRASCALE_CACHE": str(cache), "TERRASCALE_PLAN_SEED": "on" if seed else "off"}
    cmd = [sys.executable, str(ROOT / "launch" / "plan.py"), "--config", str(config), "--gpu-memory", "24GiB",
           "--cpu-memory", "128GiB", "--json"]
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        # wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux); Popen.wait would discard it
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().strip().splitlines()[-1:] or ["no output"]
    result = {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit_code": proc.returncode}
    if proc.returncode == 0:
        doc = json.loads(out)
        result.update(measured_now=doc["measured_now"], auto=doc["auto"]["profile"])
    else:
        result["error"] = tail[0]
    return result


def run(out: str | Path = "bench_results/planner.json", backbones: list[str] | None = None,
        cold: bool = True) -> dict:
    """Plan every fit-table (backbone, mode) and every shipped config, or those of `backbones`, warm and (with
    `cold`) cold; writes and returns the results."""
    from tqdm.auto import tqdm

    from trainer.config import load_experiment
    from trainer.errors import ConfigError
    from trainer.plan.fit_table import representative, shipped_experiments
    from trainer.plan.fit_table import rows as all_rows

    rows = all_rows()
    if backbones:
        unknown = sorted(set(backbones) - {name for name, _ in rows})
        if unknown:
            raise ConfigError([f"--backbones {' '.join(unknown)}: not in the catalog; choose from "
                               + ", ".join(sorted({name for name, _ in rows}))])
        rows = [(name, mode) for name, mode in rows if name in backbones]
    shipped = [(p, load_experiment(p).model.backbone) for p in shipped_experiments()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, mode in rows:
            config = Path(tmp) / f"{name}-{mode}.yaml"
            config.write_text(yaml.safe_dump(representative(name, mode).model_dump(mode="json")))
            jobs.append(({"backbone": name, "mode": mode}, config))
        jobs += [({"config": str(p.relative_to(ROOT)), "backbone": name}, p)
                 for p, name in shipped if not backbones or name in backbones]
        for i, (row, config) in enumerate(tqdm(jobs, desc="planner bench", unit="plan")):
            if cold:
                row["cold"] = _one(config, Path(tmp) / f"cold-{i}", seed=False)
            row["warm"] = _one(config, Path(tmp) / f"warm-{i}", seed=True)
            results.append(row)
    doc = {"what": "launch/plan.py wall time and peak RSS per catalog backbone (fit-table experiment) and per "
                   "shipped experiment config, fresh process each, no GPU (24 GiB budget); warm = shipped seed "
                   "cache, cold = nothing cached (includes the TerraTorch import for the decoder measurement)",
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "rows": results}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def summary(doc: dict) -> str:
    """A markdown table of the results: the README quotes it."""
    lines = ["| experiment | backbone (mode) | warm s | warm peak RSS MiB | cold s | cold peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        cells = []
        for kind in ("warm", "cold"):
            r = row.get(kind)
            if r is None:
                cells += ["—", "—"]
            elif r["exit_code"] != 0:
                cells += [f"exit {r['exit_code']}: {r['error']}", "—"]
            else:
                cells += [f"{r['seconds']:.1f}", str(r["peak_rss_mib"])]
        what = row.get("config", "fit table")
        lines.append(f"| {what} | {row['backbone']}{' (' + row['mode'] + ')' if 'mode' in row else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
