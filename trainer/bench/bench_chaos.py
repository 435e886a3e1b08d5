"""`bench chaos`: `kill -9` a small training job at random moments until it finishes; its export must equal,
bit for bit, the export of the same job run straight through.

The job is the demo (or `--config`) made small. It runs once uninterrupted in its own job dir (the reference,
also timed to place the kills), then again in another job dir under the same command, which is killed (SIGKILL
to its whole process group: launcher and every rank) N times and re-run after each kill. The kills are of three
kinds, so that some surely land at the dangerous moments rather than only where time is mostly spent:
    save     while a checkpoint is being written (a `checkpoints/step-*.tmp` directory is on disk)
    export   while the final export is being written (`export.tmp` is on disk)
    random   at a random time after the start (startup, data, model build, resume, training, eval)
A kill is survived when the next run resumes from the newest checkpoint that was complete at the kill (or starts
fresh if there was none) and does not crash. At the end, exported tensors and metadata, and metrics.jsonl (one
record per step, same losses), are compared to the reference. Results go to a JSON file; exit 1 if any check
failed.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.train.checkpoint import checkpoints_dir, list_complete

log = logging.getLogger(__name__)

# The demo made small: 32 px tiles, 4 steps per epoch on 1 process (so resumes cross epoch boundaries), a
# checkpoint every 2 steps. The user's overrides come after these.
SMALL = ["model.backbone_kwargs.img_size=32", "data.synthetic.tile_size=32", "data.synthetic.n_train=16",
         "data.synthetic.n_val=4", "data.batch_size=4", "run.max_steps=24", "run.eval_every=8",
         "run.checkpoint_every=2", "run.log_every=1", "run.progress=false", "scheduler.warmup_steps=2",
         "checkpoint.keep_last=2"]
POLL_S = 0.001  # the export is written in ~0.1 s: poll often enough to land inside it


@dataclass
class Attempt:
    kind: str | None  # the planned kill, None for a run left to finish
    exit: int | None = None  # the run's own exit code; None when we killed it
    wall_s: float = 0.0
    killed_at_s: float | None = None
    moment: str = ""  # what was on disk when the kill was sent
    confirmed: bool = False  # save/export kills: the temp dir was still there after the process group died
    resume_point: str | None = None  # newest complete checkpoint after the kill: where the next run must resume
    resumed_from: str | None = None  # what this run said it resumed from
    timed_out: bool = False
    first_step_s: float | None = None  # start to the first newly logged step (when the log had no leftovers)
    log: str = ""


@dataclass
class Timing:
    startup_s: float  # start to the first logged training step
    step_s: float


def _command(config: Path | None, overrides: list[str], processes: int) -> list[str]:
    cfg = ["--config", str(config)] if config else []
    if processes == 1:
        return [sys.executable, "-m", "trainer", "train", *cfg, *overrides]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "trainer", "train", *cfg, *overrides]


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process in the group; zombies wait for a reaper that may be slow in containers."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _temp_dirs(job: Path) -> list[str]:
    root = checkpoints_dir(job)
    found = [e.name for e in os.scandir(root) if e.name.endswith(".tmp")] if root.is_dir() else []
    return found + (["export.tmp"] if (job / "export.tmp").exists() else [])


def _temp_ids(job: Path) -> dict[str, tuple[int, int]]:
    """Each temp dir's identity (inode, mtime): a dir removed and made again under the same name is a new one."""
    out = {}
    for name in _temp_dirs(job):
        path = job / name if name == "export.tmp" else checkpoints_dir(job) / name
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out[name] = (st.st_ino, st.st_mtime_ns)
    return out


def fresh_temps(job: Path, stale: dict[str, tuple[int, int]]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """(temp dirs being written by this run, the stale ones still untouched). A temp dir left by an earlier
    killed run is stale until it vanishes or changes: the export removes and rewrites `export.tmp` under the
    same name, often between two looks, so a name alone would keep it stale for good."""
    ids = _temp_ids(job)
    stale = {n: i for n, i in stale.items() if ids.get(n) == i}
    return [n for n in ids if n not in stale], stale


def _newest(job: Path) -> str | None:
    done = list_complete(job)
    return done[-1].name if done else None


def _train_steps(job: Path) -> int:
    path = job / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if '"split": "train"' in line)


def run_once(cmd: list[str], job: Path, log_path: Path, kind: str | None, delay_s: float, nth_save: int,
             timeout_s: float, on_poll=None, done: int = 0, latest_step: int | None = None) -> Attempt:
    """One run of the job; killed (whole process group, SIGKILL) at the planned moment unless `kind` is None.

    `done`: steps of the checkpoint it resumes from. A random kill fires after `delay_s`, or at the latest
    when step `latest_step` is logged, so that a slower-than-expected start cannot let the job finish first."""
    att = Attempt(kind=kind, log=str(log_path))
    clean_log = False  # the log holds no records left by a killed run (trimmed): any new one is a new step
    next_look, logged = 0.0, 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    seen_saves: set[str] = set()
    stale = _temp_ids(job)  # left by an earlier killed run: ignored until they vanish or change (fresh_temps)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.monotonic()
        fire = False
        while proc.poll() is None:
            now = time.monotonic() - t0
            if now >= next_look:  # reading the log costs more than a stat: 4 times a second is enough
                next_look, logged = now + 0.25, _train_steps(job)
                clean_log = clean_log or logged <= done
                if clean_log and att.first_step_s is None and logged > done:
                    att.first_step_s = now
            if now > timeout_s:
                att.timed_out = fire = True
            elif kind is not None:
                temps, stale = fresh_temps(job, stale)
                if kind == "random":
                    fire = now >= delay_s or (clean_log and latest_step is not None and logged >= latest_step)
                elif kind == "save":
                    seen_saves.update(t for t in temps if t.startswith("step-"))
                    fire = len(seen_saves) >= nth_save and any(t.startswith("step-") for t in temps)
                elif kind == "export":
                    fire = "export.tmp" in temps
                if fire:
                    att.moment = (", ".join(f"writing {t}" for t in temps) or "no save or export under way") + \
                                 f"; {_train_steps(job)} step(s) logged"
            if fire:
                os.killpg(proc.pid, signal.SIGKILL)
                att.killed_at_s = None if att.timed_out else now
                break
            if on_poll:
                on_poll(now)
            time.sleep(POLL_S if kind in ("save", "export") else 0.02)
        proc.wait()
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        att.wall_s = time.monotonic() - t0
    att.exit = None if att.killed_at_s is not None else proc.returncode
    if att.killed_at_s is not None:
        left = _temp_dirs(job)
        att.confirmed = {"save": any(t.startswith("step-") for t in left), "export": "export.tmp" in left,
                         "random": True}.get(kind or "", False)
        att.resume_point = _newest(job)
    text = log_path.read_text(errors="replace")
    marker = "resumed from "
    if marker in text:
        att.resumed_from = Path(text.split(marker, 1)[1].split()[0]).name
    return att


def plan_kinds(kills: int, rng: random.Random) -> list[str]:
    """A third during saves, one in seven (at least one) during the export, the rest at random times; the
    export kills come last (after one, only the export is left to do)."""
    n_export = max(1, kills // 7) if kills >= 3 else 0
    n_save = max(1, kills // 3) if kills >= 2 else 0
    middle = ["save"] * n_save + ["random"] * (kills - n_save - n_export)
    rng.shuffle(middle)
    return middle + ["export"] * n_export


def _reference(cmd: list[str], job: Path, log_path: Path, timeout_s: float) -> tuple[Attempt, Timing]:
    marks: dict[int, float] = {}

    def watch(now: float) -> None:
        n = _train_steps(job)
        if n and n not in marks:
            marks[n] = now

    att = run_once(cmd, job, log_path, None, 0.0, 0, timeout_s, on_poll=watch)
    if att.exit != 0 or len(marks) < 2:
        raise RuntimeError(f"the uninterrupted reference run failed (exit {att.exit}); see {log_path}")
    first, last = min(marks), max(marks)
    return att, Timing(startup_s=marks[first], step_s=(marks[last] - marks[first]) / max(last - first, 1))


def compare(straight: Path, chaos: Path) -> dict:
    """Exported tensors bit for bit, export metadata, and metrics.jsonl records (each step once, same values)."""
    import torch
    from safetensors import safe_open

    def tensors(job: Path):
        with safe_open(str(job / "export" / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    (a, meta_a), (b, meta_b) = tensors(straight), tensors(chaos)
    differing = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
    records = {j: [json.loads(x) for x in (j / "metrics.jsonl").read_text().splitlines()] for j in (straight, chaos)}

    def key(r: dict) -> tuple:
        return r["split"], r["step"]

    keys = [key(r) for r in records[chaos]]
    strip = ("samples_per_s", "peak_rss_mb", "peak_gpu_mb")  # timings and memory differ run to run
    values = [{k: v for k, v in r.items() if k not in strip} for r in records[chaos]]
    ref = [{k: v for k, v in r.items() if k not in strip} for r in records[straight]]
    return {"export_bitwise_equal": a.keys() == b.keys() and not differing and meta_a == meta_b,
            "export_tensors": len(a), "export_differing_tensors": differing[:10],
            "metrics_one_record_per_step": len(keys) == len(set(keys)) == len(records[straight]),
            "metrics_equal": values == ref,
            "leftover_temp_dirs": _temp_dirs(chaos) + (["export.old"] if (chaos / "export.old").exists() else [])}


def run(config: Path | None, overrides: list[str], kills: int, seed: int, processes: int, out: Path,
        budget_s: float = 2400.0, attempt_timeout_s: float = 900.0) -> dict:
    rng = random.Random(seed)
    work = out.parent / f"{out.stem}_work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    straight, chaos = work / "straight", work / "chaos"

    def cmd(job: Path) -> list[str]:  # own data roots: kills may land in data generation too (same seed)
        return _command(config, [*SMALL, *overrides, f"data.root={job}_data", f"checkpoint.dir={job}"], processes)

    t_start = time.monotonic()
    ref, timing = _reference(cmd(straight), straight, work / "straight.log", attempt_timeout_s)
    log.info("reference run: %.0f s (startup %.1f s, %.2f s/step)", ref.wall_s, timing.startup_s, timing.step_s)
    total_steps = _train_steps(straight)
    interval = next((int(o.split("=", 1)[1]) for o in reversed([*SMALL, *overrides])
                     if o.startswith("run.checkpoint_every=")), 2)
    attempts: list[Attempt] = []
    budget_exhausted = False
    for i, kind in enumerate(plan_kinds(kills, rng)):
        if time.monotonic() - t_start > budget_s:
            budget_exhausted = True
            break
        done = int((_newest(chaos) or "step-0").split("-")[1])
        # the reference's start includes one-off costs (data generation, JIT-compiled DeepSpeed ops): the
        # quickest start seen so far is the estimate
        startup = min([timing.startup_s, *(a.first_step_s for a in attempts if a.first_step_s is not None)])
        remaining = startup + (total_steps - done) * timing.step_s
        delay = rng.uniform(0.0, min(startup + 2 * interval * timing.step_s, 0.8 * remaining))
        latest = done + min(2 * interval, total_steps - done - 1)
        nth_save = rng.choice([1, 2]) if total_steps - done > 2 * interval else 1
        att = run_once(cmd(chaos), chaos, work / f"attempt-{i:02d}.log", kind, delay, nth_save, attempt_timeout_s,
                       done=done, latest_step=latest if latest > done else None)
        attempts.append(att)
        log.info("attempt %d: %s kill at %.1f s (%s) -> newest complete %s", i, kind,
                 att.killed_at_s or -1, att.moment, att.resume_point)
        if att.killed_at_s is None:  # finished, crashed or hung before the kill: nothing left to kill
            break
    if not attempts or attempts[-1].killed_at_s is not None:
        attempts.append(run_once(cmd(chaos), chaos, work / "final.log", None, 0.0, 0, attempt_timeout_s))

    survived, problems = 0, []
    for k, prev in enumerate(attempts):
        if prev.killed_at_s is None:
            continue
        verdict = None  # judged by the first later run that got as far as resuming (or starting fresh)
        for nxt in attempts[k + 1:]:
            crashed = nxt.exit not in (None, 0) or "Traceback" in Path(nxt.log).read_text(errors="replace")
            if crashed or nxt.resumed_from is not None or nxt.exit == 0 or prev.resume_point is None:
                verdict = not crashed and nxt.resumed_from == prev.resume_point
                break  # a run killed before its resume line leaves the newest checkpoint as it was: look on
        if verdict:
            survived += 1
        else:
            problems.append(f"after the {prev.kind} kill ({prev.moment}) the next run that resumed said "
                            f"{nxt.resumed_from} (expected {prev.resume_point}), exit {nxt.exit}; see {nxt.log}")
    final = attempts[-1]
    problems += [f"a run hung for {attempt_timeout_s:.0f} s and was stopped; see {a.log}" for a in attempts
                 if a.timed_out]
    if final.exit not in (0, None) and not final.timed_out:
        problems.append(f"the last run exited {final.exit}; see {final.log}")
    delivered = [a for a in attempts if a.killed_at_s is not None]
    result = {"benchmark": "chaos", "seed": seed, "processes": processes, "kills_planned": kills,
              "kills_delivered": len(delivered), "kills_survived": survived,
              "kills_by_kind": {k: sum(a.kind == k for a in delivered) for k in ("save", "export", "random")},
              "kills_confirmed_in_save": sum(a.kind == "save" and a.confirmed for a in delivered),
              "kills_confirmed_in_export": sum(a.kind == "export" and a.confirmed for a in delivered),
              "finished": final.exit == 0, "budget_exhausted": budget_exhausted,
              "reference_s": ref.wall_s, "startup_s": timing.startup_s, "step_s": timing.step_s,
              "total_steps": total_steps, "chaos_s": sum(a.wall_s for a in attempts), "problems": problems,
              "command": cmd(chaos), "attempts": [asdict(a) for a in attempts]}
    if final.exit == 0:
        result.update(compare(straight, chaos))
    result["passed"] = bool(final.exit == 0 and not problems and survived == kills and
                            result.get("export_bitwise_equal") and result.get("metrics_equal") and
                            result.get("metrics_one_record_per_step") and not result.get("leftover_temp_dirs"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if result["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    return result


def summary(r: dict, out: Path) -> str:
    k = r["kills_by_kind"]
    lines = [f"chaos: {r['kills_survived']}/{r['kills_planned']} kills survived ({r['kills_delivered']} delivered: "
             f"{k['save']} during checkpoint saves ({r['kills_confirmed_in_save']} confirmed), {k['export']} during "
             f"the export ({r['kills_confirmed_in_export']} confirmed), {k['random']} at random moments)",
             f"export bitwise equal to the straight run: {r.get('export_bitwise_equal', 'n/a (did not finish)')}; "
             f"metrics one record per step: {r.get('metrics_one_record_per_step')}, equal: {r.get('metrics_equal')}",
             f"{len(r['attempts'])} runs in {r['chaos_s']:.0f} s (reference {r['reference_s']:.0f} s, "
             f"{r['total_steps']} steps); {'PASSED' if r['passed'] else 'FAILED'}; written to {out}"]
    lines += [f"  problem: {p}" for p in r["problems"]]
    if not r["passed"]:
        lines.append(f"  job dirs and logs kept in {out.parent / (out.stem + '_work')}")
    return "\n".join(lines)


def main(config: str | None, overrides: list[str], kills: int, seed: int, processes: int, out: Path,
         budget_s: float) -> int:
    """`terrascale bench chaos`: 0 when every kill was survived and the export is bitwise equal, else 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    r = run(Path(config) if config else None, overrides, kills, seed, processes, out, budget_s=budget_s)
    print(summary(r, out))
    return 0 if r["passed"] else 1
