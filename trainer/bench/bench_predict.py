"""`bench predict`: windows/s and peak RSS of prediction on this host, beside the planner's inference estimate.

For each case a small job is trained through the real entry point (`python launch/train.py ... run.max_steps=N`,
export on), then prediction is measured in a fresh process (`python -m trainer.bench.bench_predict measure`), because a
process's peak RSS only grows:
- a georeferenced scene of 1 window and one of `windows` windows (tile x windows*tile, no overlap) are written;
- the job predicts both through `predict_windows` (the one call into the prediction API); windows/s =
  (windows - 1) / (t_long - t_short), so model loading, which both calls pay, cancels out;
- peak RSS: the measuring process's resident peak (`ru_maxrss`: libraries, the model, the scene strips).
Beside it, the planner for the same exported experiment (`trainer.plan.inference.plan_inference`): the CPU run's
device bytes and CPU RAM (fp32, what this host predicts in), FLOPs per window (and so the GFLOP/s this CPU
reached), and the GPU bound (windows/s at the RTX 4090's dense peak, the largest nf4/bf16 batch on 24 GB).

Cases: `tiny` (the tiny variants of the shipped configs named in `TINY_CASES`), `realwidth` (a synthetic
InternVL2-40B-width checkpoint of `depth` vision and LLM layers, `synth_checkpoint`, trained one step with LoRA at
56 px, as `bench load` does). Results: `<out>/predict.json` and `predict.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MiB, GiB = 2**20, 2**30
REPEATS = 2
# The real-width job's load (its checkpoint and export, seconds) dwarfs a few small windows: give it more of them.
REALWIDTH_WINDOW_FACTOR = 4
TINY_CASES = {  # name: (config, overrides)
    "prithvi_eo_tiny": ("launch/configs/prithvi_forest.yaml", ["model.backbone=prithvi_eo_tiny"]),
    "terramind_v1_tiny": ("launch/configs/terramind_forest.yaml", ["model.backbone=terramind_v1_tiny"]),
    # lora, not the config's qlora: bitsandbytes' CPU NF4 kernel refuses the tiny variant's 32-wide layers at eval
    "internvl2_40b_tiny": ("launch/configs/internvl2_40b_forest.yaml", ["model.backbone_kwargs.tiny=true",
                                                                        "memory.profile=lora"]),
}
QUICK = ["data.synthetic.n_train=8", "data.synthetic.n_val=2", "data.batch_size=2", "run.eval_every=1000",
         "run.checkpoint_every=1000", "run.log_every=1", "run.progress=false", "run.trackers=[]",
         "scheduler.warmup_steps=0", "checkpoint.keep_last=1"]


def predict_windows(job: Path, scene: Path, out: Path, *, tile: int, batch: int, precision: str = "fp32") -> int:
    """The one call into the prediction API (`trainer.predict.predict.predict_scene`: the job's model as trained, its base
    streamed at `precision`, nf4/int8/bf16/fp32); returns the number of windows predicted."""
    from trainer.predict.predict import predict_scene

    return predict_scene(job, [scene], out, tile=tile, overlap=0, batch_size=batch, quicklook=None,
                         precision=precision).windows


def write_scene(path: Path, bands: int, height: int, width: int, seed: int = 0) -> Path:
    """A georeferenced float32 scene (UTM 50N, 10 m), values like normalized reflectances."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    data = rng.normal(0.2, 0.05, (bands, height, width)).astype("float32")
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=bands, dtype="float32",
                       crs="EPSG:32650", transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(data)
    return path


# --- inside the measuring process -----------------------------------------------------------------------


def measure(job: Path, scratch: Path, windows: int, batch: int, precision: str) -> dict[str, Any]:
    from trainer.config import load_experiment
    from trainer.plan.workload import input_shape
    from trainer.predict.predict import load_stats, resolve_export

    export = resolve_export(job)
    exp = load_experiment(export / "config.yaml")
    tile = input_shape(exp).height
    bands = len(load_stats(export, exp)[0])
    short = write_scene(scratch / "scene_1.tif", bands, tile, tile)
    long = write_scene(scratch / f"scene_{windows}.tif", bands, tile, tile * windows)
    # untimed: imports, registry set-up and first-call costs are paid once, by neither timed call
    predict_windows(job, short, scratch / "pred_warmup.tif", tile=tile, batch=batch, precision=precision)
    # short, long, short, long: the fastest of each (other jobs on a shared host only ever add time)
    times: dict[str, list[float]] = {"short": [], "long": []}
    count = {}
    for _ in range(REPEATS):
        for name, scene in (("short", short), ("long", long)):
            t0 = time.perf_counter()
            count[name] = predict_windows(job, scene, scratch / f"pred_{name}.tif", tile=tile, batch=batch,
                                          precision=precision)
            times[name].append(time.perf_counter() - t0)
    t1, tn, n1, nn = min(times["short"]), min(times["long"]), count["short"], count["long"]
    return {"tile": tile, "bands": bands, "windows": nn, "batch": batch, "precision": precision,
            "seconds_1_window": times["short"], f"seconds_{nn}_windows": times["long"],
            "windows_per_s": (nn - n1) / (tn - t1) if tn > t1 else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": __import__("torch").get_num_threads()}


def _measure_main(argv: list[str]) -> int:
    from trainer.errors import report_error
    from trainer.errors import TerrascaleError

    p = argparse.ArgumentParser(prog="python -m trainer.bench.bench_predict measure")
    p.add_argument("--job", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("--windows", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    try:
        result = measure(Path(args.job), Path(args.scratch), args.windows, args.batch, args.precision)
    except TerrascaleError as e:
        report_error(e)
        return e.exit_code
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# --- the parent ---------------------------------------------------------------------------------------------


def measure_job(job: Path, scratch: Path, windows: int, batch: int, precision: str = "fp32",
                timeout: float = 3600) -> dict[str, Any]:
    """Measure prediction of a finished job in a fresh process; {"status": "ok", ...} or the failure."""
    scratch.mkdir(parents=True, exist_ok=True)
    result_path = scratch / "measure.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "trainer.bench.bench_predict", "measure", "--job", str(job), "--scratch", str(scratch),
           "--windows", str(windows), "--batch", str(batch), "--precision", precision, "--json", str(result_path)]
    with open(scratch / "measure.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    if code == 0 and result_path.is_file():
        return {"status": "ok", **json.loads(result_path.read_text())}
    tail = (scratch / "measure.log").read_text(errors="replace").splitlines()[-12:]
    return {"status": "failed", "exit_code": code, "error": "\n".join(tail)}


def planned(job: Path, windows: int) -> dict[str, Any]:
    """The planner's inference estimate for the job's exported experiment: the CPU run this host does, and the
    GPU bound."""
    from trainer.config import load_experiment
    from trainer.plan.builders import quiet, terratorch_builders
    from trainer.plan.inference import plan_inference
    from trainer.predict.predict import resolve_export

    exp = load_experiment(resolve_export(job) / "config.yaml")
    with quiet():
        cpu = plan_inference(exp, 1 << 50, 1 << 50, windows=windows, precisions=("fp32",),
                             builders=terratorch_builders(), device="cpu")
        gpu = plan_inference(exp, 24 * GiB, 64 * GiB, windows=1, precisions=("nf4", "bf16"),
                             builders=terratorch_builders(), device="cuda")
    e = cpu.estimates["fp32"]
    return {"planned_device_mb": e.gpu["total"] / MiB if e.gpu else None,
            "planned_cpu_mb": e.cpu["total"] / MiB if e.cpu else None,
            "flops_per_window": e.flops_per_window, "backbone_params": cpu.counts.get("backbone"),
            "gpu_bound_windows_per_s": {p: g.windows_per_s for p, g in gpu.estimates.items()},
            "gpu_max_windows_24gb": {p: g.max_windows for p, g in gpu.estimates.items()}}


def train_job(config: str, overrides: list[str], job: Path, data: Path, steps: int, log: Path) -> int:
    if (job / "export" / "config.yaml").is_file():
        return 0
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / config), *QUICK, *overrides,
           f"run.max_steps={steps}", f"data.root={data}", f"checkpoint.dir={job}"]
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                              ).returncode


def realwidth_overrides(ckpt: Path, depth: int) -> list[str]:
    from trainer.backbones.vlm import default_out_indices

    idx = ",".join(map(str, default_out_indices(depth)))
    return ["model.backbone=internvl2_40b", "model.backbone_kwargs.image_size=56", "model.necks=[]",
            "model.decoder=IdentityDecoder", "model.decoder_kwargs={}", "memory.profile=lora", "run.precision=fp32",
            "data.batch_size=1", "data.synthetic.tile_size=32", f"model.backbone_kwargs.pretrained_path={ckpt}",
            f"model.backbone_kwargs.out_indices=[{idx}]"]


def run(cases: list[str], out: Path, scratch: Path, windows: int, batch: int, depth: int, steps: int,
        echo=print) -> dict[str, Any]:
    from tqdm import tqdm

    scratch.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[str, str, list[str]]] = []
    for case in cases:
        if case == "tiny":
            todo += [(name, cfg, ovr) for name, (cfg, ovr) in TINY_CASES.items()]
        elif case == "realwidth":
            todo.append((f"internvl2_40b_width_depth{depth}", "launch/configs/internvl2_26b_forest.yaml", []))
    rows = []
    for name, config, ovr in tqdm(todo, desc="bench predict", unit="case"):
        work = scratch / name
        work.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"case": name, "config": config}
        if name.startswith("internvl2_40b_width"):
            from trainer.backbones.synth_checkpoint import write_checkpoint

            ckpt = work / "checkpoint"
            if not (ckpt / "synthetic.json").is_file():
                echo(f"[bench predict] {name}: writing a real-width checkpoint of depth {depth}")
                write_checkpoint(ckpt, depth, depth)
            row["checkpoint_params_used"] = json.loads((ckpt / "synthetic.json").read_text())["params_used"]
            ovr = realwidth_overrides(ckpt, depth)
        row["overrides"] = ovr
        echo(f"[bench predict] {name}: training {steps} step(s)")
        code = train_job(config, ovr, work / "job", work / "data", steps, work / "train.log")
        if code != 0:
            row.update(status="failed", exit_code=code, error="training failed: see " + str(work / "train.log"))
            rows.append(row)
            continue
        n = windows * (REALWIDTH_WINDOW_FACTOR if name.startswith("internvl2_40b_width") else 1)
        echo(f"[bench predict] {name}: predicting 1 and {n} windows, {REPEATS} times each")
        row.update(measure_job(work / "job", work / "predict", n, batch))
        if row["status"] == "ok":
            row.update(planned(work / "job", batch))
            if row.get("flops_per_window") and row.get("windows_per_s"):
                row["cpu_gflops_reached"] = row["windows_per_s"] * row["flops_per_window"] / 1e9
            echo(f"[bench predict] {name}: {_f(row['windows_per_s'])} windows/s, peak RSS {row['peak_rss_mb']:.0f} MiB"
                 f" (planned CPU {row['planned_cpu_mb']:.0f} MiB)")
        rows.append(row)
    import torch

    doc = {"schema": "terrascale.bench_predict/1", "windows": windows, "batch": batch, "steps": steps,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
           "loadavg_at_end": os.getloadavg(), "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(markdown(doc))
    return doc


def _f(v, fmt=".3g") -> str:
    return "—" if v is None else format(v, fmt)


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Prediction on this host ({doc['machine']}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in doc['loadavg_at_end'])}): {doc['batch']} windows per batch, fp32; "
             "windows/s = (N - 1) / (fastest N-window run - fastest 1-window run), so model loading cancels; beside "
             "the planner (CPU run; and the GPU bound at the RTX 4090's dense peak).", "",
             "| case | params | tile px | windows N | windows/s (CPU) | GFLOP/window | CPU GFLOP/s reached | peak RSS MiB | planned "
             "CPU MiB | planned tensors MiB | GPU bound windows/s nf4 / bf16 | max windows on 24 GB nf4 / bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | failed (exit {r.get('exit_code')}): {r.get('error', '')[:80]} "
                         "| | | | | | | | | | |")
            continue
        b, m = r.get("gpu_bound_windows_per_s", {}), r.get("gpu_max_windows_24gb", {})
        params = r.get("backbone_params")
        lines.append(f"| {r['case']} | {_f(params / 1e9 if params else None)}B | {r['tile']} | {r['windows']} | "
                     f"{_f(r['windows_per_s'])} | "
                     f"{_f(r['flops_per_window'] / 1e9)} | {_f(r.get('cpu_gflops_reached'))} | {r['peak_rss_mb']:.0f} | "
                     f"{_f(r['planned_cpu_mb'], '.0f')} | {_f(r['planned_device_mb'], '.0f')} | "
                     f"{_f(b.get('nf4'))} / {_f(b.get('bf16'))} | {m.get('nf4')} / {m.get('bf16')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] != ["measure"]:
        sys.exit("usage: python -m trainer.bench.bench_predict measure ... (the benchmark itself: launch/bench.py predict)")
    sys.exit(_measure_main(sys.argv[2:]))
