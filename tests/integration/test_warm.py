"""The warm children of `helpers.run_train` (tests/integration/warm.py) behave like `python launch/X.py`: same
argv, cwd, environment, exit code, output and tracebacks, fresh RNGs and signal dispositions; and a training run
gives the same metrics and bitwise the same export on both paths."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.integration import warm
from tests.integration.helpers import ROOT, TINY, check, env, load_export, metrics, run_train

PROBE = ROOT / "tests/integration/scripts/warm_probe.py"
RANDOM = ("torch_seed", "torch_rand", "random", "numpy")
# The probes' own environment, hence their own zygote (the session's stays untouched); shared by the tests below
# so that they start one zygote between them, not one each.
PROBE_ENV = "from the caller"


def _both(args: list[str], cwd, e):
    cmd = [sys.executable, str(PROBE), *args]
    w = warm.run(cmd, cwd, e, timeout=300)
    assert w is not None, "no warm zygote: every launch would pay its imports again"
    r = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=300)
    return w, r


def test_warm_child_sees_what_a_fresh_process_sees(tmp_path):
    e = {**env(), "WARM_PROBE": PROBE_ENV}
    (w, r), (w2, _) = _both(["7", "two words"], tmp_path, e), _both(["3"], tmp_path, e)
    assert (w.returncode, r.returncode, w2.returncode) == (7, 7, 3)
    assert w.stderr == r.stderr == "to stderr\n"
    seen_w, seen_r, seen_w2 = (json.loads(p.stdout) for p in (w, r, w2))
    assert {k: v for k, v in seen_w.items() if k not in RANDOM} == {k: v for k, v in seen_r.items() if k not in RANDOM}
    assert seen_w["argv"] == [str(PROBE), "7", "two words"] and seen_w["cwd"] == str(tmp_path)
    assert seen_w["env"] == PROBE_ENV and seen_w["main"] == "__main__" and seen_w["sigint"] == (signal.getsignal(signal.SIGINT) != signal.SIG_IGN)
    # fresh RNGs: two children of one zygote do not replay one stream
    assert all(seen_w[k] != seen_w2[k] for k in RANDOM)


def test_warm_child_runs_a_module_like_python_m():
    cmd = [sys.executable, "-m", "tests.integration.scripts.warm_probe", "4"]
    w = warm.run(cmd, ROOT, env(), timeout=300)
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert w is not None and w.returncode == r.returncode == 4 and w.stderr == r.stderr
    seen_w, seen_r = json.loads(w.stdout), json.loads(r.stdout)
    assert {k: v for k, v in seen_w.items() if k not in RANDOM} == {k: v for k, v in seen_r.items() if k not in RANDOM}
    assert seen_w["argv"] == [str(PROBE), "4"] and seen_w["path0"] == str(ROOT)


def test_warm_child_reports_an_uncaught_exception_like_the_interpreter(tmp_path):
    w, r = _both(["raise"], tmp_path, env())
    assert w.returncode == r.returncode == 1
    assert w.stderr == r.stderr and "RuntimeError: probe failed on purpose" in w.stderr and "warm.py" not in w.stderr


def test_warm_child_is_killed_at_the_timeout(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run([sys.executable, str(PROBE), "sleep"], tmp_path, env(), timeout=3)
    assert time.monotonic() - t0 < 60


def assert_same_run(a_job, b_job) -> None:
    """Same metrics records and bitwise the same export. Peak RSS is the one field that differs: a forked child
    shares the zygote's imported pages."""
    def strip(recs):
        return [{k: v for k, v in m.items() if k not in ("time", "elapsed", "samples_per_s", "peak_rss_mb")}
                for m in recs]

    assert strip(metrics(a_job)) == strip(metrics(b_job))
    a, b = load_export(a_job), load_export(b_job)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_warm_and_real_training_runs_are_equal(tmp_path):
    args = [*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=full", "run.max_steps=4"]
    w = check(run_train([*args, f"checkpoint.dir={tmp_path / 'warm'}"]))
    r = check(run_train([*args, f"checkpoint.dir={tmp_path / 'real'}"], warm=False))
    assert "profile full" in w.stderr and "profile full" in r.stderr
    assert_same_run(tmp_path / "warm", tmp_path / "real")


def test_a_zygote_whose_socket_was_removed_is_replaced_aloud(tmp_path, capsys):
    """Seen in CI: another process cleaned /tmp under a running session, and every later warm launch failed."""
    import shutil

    # not the session's zygote (that one stays untouched), and one that preloads nothing: what is tested here is
    # the replacement, not the imports (two zygotes' worth of them would cost 30-40 s of CPU)
    e = {**env(), "WARM_PROBE": PROBE_ENV, warm.PRELOAD_ENV: ""}
    cmd = [sys.executable, str(PROBE), "5"]
    assert warm.run(cmd, tmp_path, e, timeout=300).returncode == 5
    old = warm._zygotes[warm._key(e)]
    shutil.rmtree(old.dir)
    again = warm.run(cmd, tmp_path, e, timeout=300)
    assert again is not None and again.returncode == 5
    assert warm._zygotes[warm._key(e)] is not old and old.proc.poll() is not None
    assert "starting a new one" in capsys.readouterr().err


@pytest.mark.slow
def test_warm_ranks_and_a_real_two_process_launch_are_equal(tmp_path):
    """`run_train(nproc=2)` forks both ranks from the zygote with the environment `accelerate launch` gives its
    workers; a ZeRO-3 + CPU offload run must give what the real `accelerate launch` gives, bit for bit."""
    args = [*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=zero3_offload", "run.max_steps=4"]
    w = check(run_train([*args, f"checkpoint.dir={tmp_path / 'warm'}"], nproc=2))
    r = check(run_train([*args, f"checkpoint.dir={tmp_path / 'real'}"], nproc=2, warm=False))
    assert w.args[0] == sys.executable and r.args[0].endswith("accelerate"), "both ran the real launcher"
    for out in (w, r):
        assert "2 process(es)" in out.stderr and "DeepSpeed ZeRO-3" in out.stderr
    assert_same_run(tmp_path / "warm", tmp_path / "real")


def test_warm_ranks_exit_like_the_launcher_when_one_fails(tmp_path):
    """A failing rank's own exit code comes back (a config error: 2), the other rank is stopped, nothing hangs."""
    cmd = [sys.executable, str(PROBE), "rank-exit"]
    t0 = time.monotonic()
    r = warm.run_ranks(cmd, tmp_path, env(), 2, 29555, timeout=300, grace=5)
    assert r is not None and r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "rank 1 exits 2" in r.stderr and "rank 0 waits" in r.stderr
    assert time.monotonic() - t0 < 120


def test_in_process_imports_do_not_change_the_launch_environment(monkeypatch):
    """Seen under `pytest -n 2`: Lightning's seed_everything and OpenCV's import, run in-process by one test, put
    PL_GLOBAL_SEED / LD_LIBRARY_PATH into os.environ; every later launch then needed another zygote."""
    from tests.integration import helpers

    before = warm._key(env())
    for key in helpers.IMPORT_SIDE_EFFECTS:
        if key not in helpers._SESSION_ENV:
            monkeypatch.setenv(key, "set by an import")
    assert warm._key(env()) == before
    monkeypatch.setenv("TERRASCALE_SOMETHING_A_TEST_SETS", "1")  # what a test sets on purpose still reaches launches
    assert env()["TERRASCALE_SOMETHING_A_TEST_SETS"] == "1" and warm._key(env()) != before
