"""`bench load`: peak RSS and time of loading a real-width, reduced-depth InternVL2-40B-class checkpoint.

For each depth (vision layers = LLM layers = depth) a synthetic checkpoint is written (`synth_checkpoint`,
bf16 shards + index + config.json), then for each memory profile the real training entry runs one step on
it in a fresh process (`python launch/train.py --config launch/configs/internvl2_26b_forest.yaml
model.backbone=internvl2_40b ... run.max_steps=1 run.precision=bf16`), while the peak RSS of its process
tree is sampled every 50 ms (psutil). Reported per run:

- baseline: peak RSS of the same command with `model.backbone_kwargs.tiny=true` and no checkpoint
  (interpreter, torch, TerraTorch, DeepSpeed, data, head): what the process costs without the weights;
- peak_load: peak until `<job>/load.json` appears (the loader writes it once the model is built),
  peak_run: peak over the whole run (step, final eval, checkpoint included);
- B/param above baseline = (peak - baseline) / backbone parameters loaded (LM head and text embeddings,
  written but skipped, are not counted), and the slope (bytes per parameter) between two depths, which
  extrapolates to the full 40B model without any baseline;
- load seconds build/read/place/quantize from load.json, and `cat` of the same files to /dev/null with
  the page cache dropped first (when the host allows it), the I/O floor of `read`.

The neck/decoder are replaced by IdentityDecoder (no necks): TerraTorch's LearnedInterpolateToPyramidal at
7168 channels alone is ~231M fp32 trainable parameters, which would measure the decoder, not the loader.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launch/configs/internvl2_26b_forest.yaml"
TARGETS = {"qlora": 0.6, "zero3_offload_lora": 2.3}  # B/param above the process baseline (issue #12)
TARGET_BUILD_READ_S_PER_B = 2.0
GB = 1e9


def overrides(job: Path, data: Path, profile: str, depth: int | None, ckpt: Path | None,
              image_size: int = 56) -> list[str]:
    """The experiment: one bf16 step at batch 1 on tiny synthetic tiles; `depth` None = the tiny baseline."""
    from trainer.backbones.vlm import default_out_indices

    common = ["model.backbone=internvl2_40b", f"model.backbone_kwargs.image_size={image_size}",
              "model.necks=[]", "model.decoder=IdentityDecoder", "model.decoder_kwargs={}",
              f"memory.profile={profile}", "run.max_steps=1", "run.precision=bf16", "run.eval_every=1000",
              "run.checkpoint_every=1000", "run.log_every=1", "run.progress=false", "run.trackers=[]",
              "scheduler.warmup_steps=0", "data.batch_size=1", "data.synthetic.n_train=2", "data.synthetic.n_val=1",
              "data.synthetic.tile_size=32", f"data.root={data}", f"checkpoint.dir={job}", "checkpoint.keep_last=1",
              "checkpoint.export=false"]
    if depth is None:
        return common + ["model.backbone_kwargs.tiny=true"]
    idx = ",".join(map(str, default_out_indices(depth)))  # ends at the last LLM layer: every layer is used
    return common + [f"model.backbone_kwargs.pretrained_path={ckpt}", f"model.backbone_kwargs.out_indices=[{idx}]"]


def drop_page_cache() -> bool:
    """Drop clean page-cache pages (root only); True if the cache really shrank or was already small."""
    def cached() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
        return 0
    before = cached()
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return cached() < max(before // 2, 256 << 20)


def cat_seconds(ckpt: Path) -> dict:
    dropped = drop_page_cache()
    files = sorted(str(p) for p in ckpt.glob("*.safetensors"))
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return {"cat_s": time.perf_counter() - t0, "cache_dropped": dropped}


class PeakSampler:
    """RSS of a process and its descendants, sampled every `period` s in a thread: (time.time(), bytes)."""

    def __init__(self, pid: int, period: float = 0.05):
        import psutil

        self.proc, self.period = psutil.Process(pid), period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._rss()))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float = 0.0, stop: float = float("inf")) -> int | None:
        inside = [rss for t, rss in self.samples if start <= t <= stop]
        return max(inside) if inside else None

    def rss_at(self, when: float) -> int | None:
        """The last sample taken at or before `when`."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else None


_LOADED = re.compile(r"^(\d\d):(\d\d):(\d\d) \S+ \S+: loaded \d+ tensors from ")


def load_window(log_text: str, load: dict, started: float) -> tuple[float, float] | None:
    """(start, end) of the checkpoint load in time.time(): the loader logs `loaded N tensors from ...` when
    done (HH:MM:SS, local time, floored: at most 1 s early) and load.json has the seconds it took."""
    for line in log_text.splitlines():
        m = _LOADED.match(line)
        if m:
            day = time.localtime(started)
            end = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, int(m[1]), int(m[2]), int(m[3]), 0, 0, -1))
            if end < started - 1:  # the run crossed midnight
                end += 86400
            return end - sum((load.get("seconds") or {}).values()), end + 1.0
    return None


def run_once(args: list[str], job: Path, timeout: float, log_path: Path) -> dict:
    """One training run with its RSS trace. peak_run: the whole run; peak_setup: until load.json (written after
    the model is built and prepared); peak_load and pre_load: inside / right before the load window."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(CONFIG), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0, started = time.perf_counter(), time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        sampler = PeakSampler(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        sampler.stop()
    text = log_path.read_text(errors="replace")
    out = {"exit_code": rc, "wall_s": time.perf_counter() - t0, "peak_run_bytes": sampler.peak(),
           "peak_setup_bytes": None, "peak_load_bytes": None, "pre_load_bytes": None, "log": str(log_path)}
    load_json = job / "load.json"
    if load_json.exists():
        out["load"] = json.loads(load_json.read_text())
        out["peak_setup_bytes"] = sampler.peak(stop=load_json.stat().st_mtime)
        window = load_window(text, out["load"], started)
        if window:
            out["pre_load_bytes"] = sampler.rss_at(window[0] - 0.1)
            out["peak_load_bytes"] = sampler.peak(*window)
            out["load_window_s"] = [window[0] - started, window[1] - started]
    if rc != 0:
        lines = text.splitlines()
        out["error"] = next((l.strip() for l in reversed(lines) if "Error" in l or "error:" in l), lines[-1:])
    return out


def _summarize(run: dict, base: int | None, params: int) -> None:
    """B/param: the load (peak in the load window above the RSS right before it) and the whole run (peak above
    the tiny-run baseline); the old loader writes no load.json, so only the latter exists for it."""
    if base is not None and run["exit_code"] == 0:
        run["b_per_param_run"] = (run["peak_run_bytes"] - base) / params
        if run["peak_setup_bytes"]:
            run["b_per_param_setup"] = (run["peak_setup_bytes"] - base) / params
    if run["exit_code"] == 0 and run.get("pre_load_bytes") and run["peak_load_bytes"]:
        run["b_per_param_above_pre_load"] = (run["peak_load_bytes"] - run["pre_load_bytes"]) / params
    secs = (run.get("load") or {}).get("seconds")
    if secs:
        run["build_read_s_per_b"] = (secs.get("build", 0) + secs.get("read", 0)) / (params / GB)
        run["quantize_s_per_b"] = secs.get("quantize", 0) / (params / GB)


def run(depths: list[int], profiles: list[str], layout: str, out: Path, scratch: Path, timeout: float = 1800,
        vocab: int = 4096, keep: bool = False) -> dict:
    import shutil

    from trainer.backbones.synth_checkpoint import write_checkpoint

    scratch.mkdir(parents=True, exist_ok=True)
    data, logs = scratch / "data", out.parent / "load_logs"
    doc = {"benchmark": "load", "backbone": "internvl2_40b", "layout": layout, "vocab": vocab, "profiles": profiles,
           "depths": depths, "machine": f"{platform.machine()} cores={os.cpu_count()}", "targets": {
               "b_per_param": TARGETS, "build_read_s_per_b": TARGET_BUILD_READ_S_PER_B},
           "baseline": {}, "checkpoints": {}, "runs": []}
    for p in profiles:  # the process without the weights
        job = scratch / f"job_base_{p}"
        shutil.rmtree(job, ignore_errors=True)
        r = run_once(overrides(job, data, p, None, None), job, timeout, logs / f"base_{p}.log")
        doc["baseline"][p] = r
        print(f"baseline {p}: peak {r['peak_run_bytes'] / GB:.2f} GB, exit {r['exit_code']}", flush=True)
    for d in depths:
        ckpt = scratch / f"ckpt_{layout}_d{d}"
        t0 = time.perf_counter()
        info = write_checkpoint(ckpt, d, d, layout, vocab=vocab)
        info.update(write_s=time.perf_counter() - t0, **cat_seconds(ckpt))
        doc["checkpoints"][d] = info
        print(f"depth {d}: {info['params_used'] / GB:.3f}B params used ({info['bytes'] / GB:.2f} GB on disk) "
              f"written in {info['write_s']:.0f} s; cat {info['cat_s']:.1f} s", flush=True)
        for p in profiles:
            job = scratch / f"job_d{d}_{p}"
            shutil.rmtree(job, ignore_errors=True)
            drop_page_cache()
            r = run_once(overrides(job, data, p, d, ckpt), job, timeout, logs / f"d{d}_{p}.log")
            base = doc["baseline"][p]
            shard = max(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            r.update(depth=d, profile=p, params=info["params_used"], shard_b_per_param=shard / info["params_used"])
            _summarize(r, base["peak_run_bytes"] if base["exit_code"] == 0 else None, info["params_used"])
            doc["runs"].append(r)
            _write(doc, out)  # after every run: a long bench that is stopped keeps what it measured
            print(f"  {p}: exit {r['exit_code']} in {r['wall_s']:.0f} s, pre-load {_gb(r['pre_load_bytes'])}, "
                  f"peak load {_gb(r['peak_load_bytes'])}, peak run {_gb(r['peak_run_bytes'])}: "
                  f"{_f(r.get('b_per_param_above_pre_load'))} B/param load, {_f(r.get('b_per_param_run'))} run "
                  f"{r.get('error', '')}", flush=True)
            shutil.rmtree(job, ignore_errors=True)
        if not keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    _write(doc, out)
    return doc


def _write(doc: dict, out: Path) -> None:
    doc["slopes"] = slopes(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(doc))


def slopes(doc: dict) -> dict:
    """Bytes per parameter between the shallowest and deepest successful depth, per profile: no baseline needed."""
    res = {}
    for p in doc["profiles"]:
        ok = sorted((r for r in doc["runs"] if r["profile"] == p and r["exit_code"] == 0), key=lambda r: r["depth"])
        if len(ok) >= 2:
            a, b = ok[0], ok[-1]
            dp = b["params"] - a["params"]
            res[p] = {"depths": [a["depth"], b["depth"]], "run": (b["peak_run_bytes"] - a["peak_run_bytes"]) / dp}
            if a["peak_load_bytes"] and b["peak_load_bytes"]:
                res[p]["load"] = (b["peak_load_bytes"] - a["peak_load_bytes"]) / dp
    return res


def _gb(n) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def verdict(r: dict) -> str:
    if r["exit_code"] != 0:
        return f"FAILED: {str(r.get('error', ''))[:90]}"
    target, bpp = TARGETS.get(r["profile"]), r.get("b_per_param_run")
    if target is None or bpp is None:
        return "ok"
    return f"{'meets' if bpp <= target + r['shard_b_per_param'] else 'misses'} <= {target} (+1 shard) B/param"


def markdown(doc: dict) -> str:
    rows = ["| profile | depth | params (B) | baseline GB | pre-load GB | peak load GB | peak run GB "
            "| B/param load | B/param run | slope B/param | build / read / place / quantize s | build+read s/B "
            "| cat s | wall s | result |", "|" + "---|" * 15]
    for r in doc["runs"]:
        p, d = r["profile"], r["depth"]
        secs = (r.get("load") or {}).get("seconds") or {}
        split = " / ".join(_f(secs.get(k), ".1f") for k in ("build", "read", "place", "quantize"))
        slope = doc["slopes"].get(p, {})
        slope_txt = (f"{slope['run']:.2f} run" + (f", {slope['load']:.2f} load" if "load" in slope else "")
                     if slope and d == slope["depths"][1] else "")
        rows.append(f"| {p} | {d} | {r['params'] / GB:.3f} | {_gb(doc['baseline'][p]['peak_run_bytes'])} | "
                    f"{_gb(r['pre_load_bytes'])} | {_gb(r['peak_load_bytes'])} | {_gb(r['peak_run_bytes'])} | "
                    f"{_f(r.get('b_per_param_above_pre_load'))} | {_f(r.get('b_per_param_run'))} | {slope_txt} | "
                    f"{split} | {_f(r.get('build_read_s_per_b'), '.1f')} | {doc['checkpoints'][d]['cat_s']:.1f} | "
                    f"{r['wall_s']:.0f} | {verdict(r)} |")
    dropped = all(c["cache_dropped"] for c in doc["checkpoints"].values())
    notes = [f"InternVL2-40B widths (InternViT-6B 3200, Yi-34B 7168, projector 12800→7168), vision layers = LLM "
             f"layers = depth, bf16 safetensors shards, {doc['layout']} layout, vocab reduced to {doc['vocab']} (LM "
             "head and text embeddings are written, skipped by the loader, not counted in params). One training "
             "step through launch/train.py, batch 1, 56 px, bf16, IdentityDecoder. baseline: peak RSS of the same "
             "command with `model.backbone_kwargs.tiny=true`; pre-load / peak load: RSS right before / peak inside "
             "the load window (the loader's `loaded N tensors` log line minus load.json's seconds); B/param load = "
             "(peak load - pre-load) / params, B/param run = (peak run - baseline) / params, the target's measure; "
             f"slope: between the two depths. cat: the same files to /dev/null, page cache dropped first: "
             f"{dropped}. {doc['machine']}."]
    return "\n".join(rows + [""] + notes) + "\n"
