"""Warm children for the integration tests: `python launch/X.py ...` forked from a process that has already
imported torch, DeepSpeed, Accelerate, TerraTorch and trainer (a "zygote"), instead of paying 15-40 s of imports
per launch on the 2-core CI machine.

What a warm child is, and why it behaves like `python launch/X.py`:
- the zygote is started with the same environment the tests give their launches (`helpers.env()`), so anything
  read from the environment at import time (OMP_NUM_THREADS, DS_ACCELERATOR, TORCH_EXTENSIONS_DIR) is the same;
  a launch whose environment differs in anything else than PYTEST_CURRENT_TEST gets its own zygote;
- the zygote imports modules only and runs no training code; it checks that it is single-threaded before it
  forks (no OpenMP pool, no tqdm monitor, no gloo thread can be half-copied);
- the child gets the caller's argv, environment (os.environ replaced), cwd, stdin/stdout/stderr (the file
  descriptors themselves, passed over a unix socket), default signal dispositions, its own process group, and
  fresh RNGs (Python's `random` reseeded from the OS, numpy's global state reseeded, torch's default generator
  back to the seed a new process starts with); it runs the script with `runpy` as `__main__` and exits with its
  exit code, a traceback and exit 1 for an uncaught exception, like the interpreter;
- the caller gets a `subprocess.CompletedProcess` with the same returncode convention (-N for a signal).
What differs: warnings printed while *importing* the preloaded modules are printed once by the zygote, not by
each child; module-level state of the preloaded modules is the state right after import (the same as a fresh
process). Tests that signal the launcher or need `accelerate launch` keep using real processes (`train_cmd`);
`tests/integration/test_warm.py` checks warm == real on a probe script and on a training run.

Set TERRASCALE_TEST_WARM=0 to run every launch as a real process.
"""
from __future__ import annotations

import array
import atexit
import gc
import hashlib
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRELOAD = ("torch", "numpy", "deepspeed", "accelerate", "terratorch", "transformers", "peft", "safetensors.torch",
           "rasterio", "torchmetrics", "trainer.cli", "trainer.train.checkpoint", "trainer.runtime",
           "trainer.train.validate", "trainer.train.run", "trainer.train.loop", "trainer.model.models",
           "trainer.train.export", "trainer.predict.predict")
# change per test / per rank; read by nothing at import time (so every rank of a launch forks from one zygote)
RANK_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
# The zygote the pytest-xdist controller starts for its workers (`share`): "<key> <pid> <socket>", inherited by them.
SHARED = "TERRASCALE_TEST_ZYGOTE"
# Which modules a zygote imports: PRELOAD unless this names others (comma-separated; empty: none). For tests of
# the zygote machinery itself, which need a zygote but not its 15-20 s of imports.
PRELOAD_ENV = "TERRASCALE_TEST_WARM_PRELOAD"
# (pytest-xdist's workers also have COLUMNS/LINES, which the controller has not: read when printing, not importing)
VOLATILE = ("PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID",
            "COLUMNS", "LINES", SHARED, *RANK_KEYS)
READY = b"ready\n"


def enabled() -> bool:
    return os.environ.get("TERRASCALE_TEST_WARM", "1") != "0"


# --------------------------------------------------------------------------------------------------- server
# pyarrow (imported by TerraTorch through `datasets`) links jemalloc, which starts a background purging thread;
# jemalloc takes its locks in a pthread_atfork handler and restarts the thread in the child, so it is fork-safe.
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}


def _threads() -> list[str]:
    """Names of this process's threads other than the main one and the known fork-safe ones."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            if name not in FORK_SAFE_THREADS:
                names.append(name)
    return names


INHERITED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGALRM)


def ignored_by_caller() -> list[int]:
    """Signals this process ignores: a child it exec'd would inherit SIG_IGN for them (e.g. SIGINT under `cmd &`
    in a non-interactive shell, where CPython then installs no KeyboardInterrupt handler either)."""
    return [int(s) for s in INHERITED if signal.getsignal(s) == signal.SIG_IGN]


def _fresh_state(ignored: list[int]) -> None:
    """What a new interpreter exec'd by the caller starts with: default signal dispositions except those the caller
    ignores, fresh RNGs."""
    import random

    for sig in (*INHERITED, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # CPython ignores SIGPIPE at start-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].random.default_generator.seed()  # a new process's generator starts from a random seed


def _print_uncaught(e: BaseException, script: str | None) -> None:
    """The traceback the interpreter prints: from the script's frame on (not this module's and runpy's)."""
    import traceback

    tb = e.__traceback__
    if script is None:  # -m: from runpy's frames on, as the interpreter shows them
        tb = tb.tb_next
    while script and tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != os.path.abspath(script):
        tb = tb.tb_next
    traceback.print_exception(type(e), e, tb or e.__traceback__)


def _child(req: dict, fds: list[int]) -> None:
    """In the forked worker: become `python <argv...>` and never return."""
    code = 1
    try:
        os.setpgid(0, 0)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        _fresh_state(req.get("ignored", []))
        import runpy

        if req["argv"][1] == "-m":  # `python -m pkg args`: argv[0] becomes the module's file, sys.path[0] the cwd
            module, script = req["argv"][2], None
            sys.argv = [req["argv"][2], *req["argv"][3:]]
            sys.path[0] = os.getcwd()
        else:
            module, script = None, req["argv"][1]
            sys.argv = req["argv"][1:]
            sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt as e:  # the interpreter prints the traceback, then dies of SIGINT (returncode -2)
            _print_uncaught(e, script)
            code = -signal.SIGINT
        except BaseException as e:  # noqa: BLE001 -- the interpreter's own top level: print and exit 1
            _print_uncaught(e, script)
            code = 1
        # Like interpreter shutdown: atexit handlers, then flush.
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 -- a closed pipe must not change the exit code
                pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def _monitor(conn: socket.socket, req: dict, fds: list[int]) -> None:
    """Forked per request: fork the worker, tell the caller its pid, wait, send its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(req, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    sel = selectors.DefaultSelector()
    sel.register(conn, selectors.EVENT_READ)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if sel.select(timeout=0.1) and not conn.recv(1):  # the caller went away: take the worker's group down
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        conn.sendall(json.dumps({"returncode": rc}).encode() + b"\n")
    except OSError:
        pass
    os._exit(0)


def serve(path: str) -> None:
    # Imports write their warnings here, once, to the zygote's stderr (the caller's log file).
    t0 = time.time()
    preload = PRELOAD if PRELOAD_ENV not in os.environ else [m for m in os.environ[PRELOAD_ENV].split(",") if m]
    # No cyclic collection while importing, and what the imports built frozen afterwards: the children inherit it
    # and no collection of theirs walks it (as `trainer.runtime.pause_gc_for_start_up` does for a real start-up)
    gc.disable()
    for name in preload:
        try:
            __import__(name)
        except ImportError as e:
            print(f"[warm] could not preload {name}: {e}", file=sys.stderr)
    from trainer.runtime import gc_after_start_up

    gc_after_start_up()
    if _threads():
        print(f"[warm] refusing to fork: threads {_threads()} running after imports", file=sys.stderr)
        sys.exit(3)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    srv.settimeout(0.5)
    print(f"[warm] ready in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    Path(path + ".ready").touch()  # for the clients that are not its parent (`_Shared`)
    while True:
        try:  # reap finished monitors
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if os.getppid() == 1:  # the test session died
            return
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        buf = msg
        while not buf.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                break
            buf += more
        req = json.loads(buf)
        if os.fork() == 0:
            srv.close()
            _monitor(conn, req, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------------------------------- client
class _Zygote:
    def __init__(self, env: dict[str, str]):
        self.dir = tempfile.mkdtemp(prefix="terrascale-warm-")
        self.sock = os.path.join(self.dir, "s")
        self.log = open(os.path.join(self.dir, "zygote.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.warm", self.sock], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL)
        self._ready = False

    def wait_ready(self, timeout: float = 600) -> bool:
        if self._ready:
            return True
        line = self.proc.stdout.readline()  # blocks until imported (or dead)
        self._ready = line == READY
        if not self._ready:
            self.log.flush()
            print(f"[warm] zygote failed; see {self.log.name}", file=sys.stderr)
        return self._ready

    def gone(self) -> str | None:
        """Why this zygote can no longer serve (it died, or its socket was removed under it), or None. One that never
        came up is not "gone": `wait_ready` reports it."""
        if self._ready and (self.proc.poll() is not None or not os.path.exists(self.sock)):
            return (f"zygote {self.proc.pid} gone (exit {self.proc.poll()}, socket {self.sock} "
                    f"{'present' if os.path.exists(self.sock) else 'missing'})")
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._ready or os.path.exists(self.sock + ".ready"):  # a failed one keeps its log for the message
            import shutil

            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class _Shared:
    """A zygote another process of this session started and owns (the xdist controller: `share`), as a worker sees
    it: its socket, and its pid to tell whether it is still there."""

    def __init__(self, pid: int, sock: str):
        self.pid, self.sock = pid, sock

    def _alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()

    def wait_ready(self, timeout: float = 600) -> bool:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock + ".ready"):
            if not self._alive() or time.monotonic() > deadline:
                print(f"[warm] the session's shared zygote {self.pid} did not come up", file=sys.stderr)
                return False
            time.sleep(0.2)
        return True

    def gone(self) -> str | None:
        """As `_Zygote.gone`; a zygote still importing (no socket yet) is not gone: `wait_ready` waits for it."""
        if not self._alive() or (os.path.exists(self.sock + ".ready") and not os.path.exists(self.sock)):
            return (f"shared zygote {self.pid} gone ({'alive' if self._alive() else 'exited'}, socket {self.sock} "
                    f"{'present' if os.path.exists(self.sock) else 'missing'})")
        return None

    def close(self) -> None:  # its owner closes it
        pass


_zygotes: dict[str, _Zygote | _Shared] = {}


def _key(env: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in sorted(env.items()) if k not in VOLATILE}).encode()).hexdigest()


def _shared(key: str) -> _Shared | None:
    """The controller's zygote, if it was started for this environment."""
    shared_key, pid, sock = (os.environ.get(SHARED) or "- 0 -").split(" ", 2)
    return _Shared(int(pid), sock) if shared_key == key else None


def zygote(env: dict[str, str]) -> _Zygote | _Shared | None:
    k = _key(env)
    if k not in _zygotes and (shared := _shared(k)) is not None:
        _zygotes[k] = shared
    z = _zygotes.get(k)
    if z is not None and (why := z.gone()):
        # died, or its socket was removed under it (a /tmp clean-up by another process): a new one, said aloud
        print(f"[warm] {why}: starting a new one", file=sys.stderr)
        z.close()
        z = None
    if z is None:
        z = _zygotes[k] = _Zygote(env)
    return z if z.wait_ready() else None


@atexit.register
def _close_all() -> None:
    for z in _zygotes.values():
        z.close()


def prestart(env: dict[str, str]) -> None:
    """Start importing in the background now (e.g. at session start); the first launch then waits less."""
    if enabled() and _key(env) not in _zygotes and _shared(_key(env)) is None:
        _zygotes[_key(env)] = _Zygote(env)


def share(env: dict[str, str]) -> None:
    """Start the zygote for `env` in this process (pytest-xdist's controller, before it starts its workers) and
    name it in os.environ, so that the workers, which inherit that, fork from it instead of starting one each
    (15-20 s of imports on a 2-core machine). Closed when this process exits."""
    if enabled() and _key(env) not in _zygotes:
        z = _zygotes[_key(env)] = _Zygote(env)
        os.environ[SHARED] = f"{_key(env)} {z.proc.pid} {z.sock}"


def _servable(argv: list[str]) -> bool:
    return enabled() and argv[0] == sys.executable and len(argv) >= 2 and not (
        argv[1].startswith("-") and (argv[1] != "-m" or len(argv) < 3))


class _Launch:
    """One warm child in flight: its pid, its output being collected, its exit status still to come."""

    def __init__(self, z: _Zygote, argv: list[str], cwd: str | Path, env: dict[str, str]):
        self.argv = argv
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(z.sock)
        req = json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env,
                          "ignored": ignored_by_caller()}).encode() + b"\n"
        socket.send_fds(self.conn, [req], [devnull, out_w, err_w])
        for fd in (devnull, out_w, err_w):
            os.close(fd)
        self.fds = (out_r, err_r)
        self.chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        self.readers = [threading.Thread(target=self._drain, args=(fd,), daemon=True) for fd in self.fds]
        for t in self.readers:
            t.start()
        self.buf = b""
        self.pid = json.loads(self._line(None))["pid"]
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes | None:
        """The monitor's next line; b"" if it closed the connection, None if nothing came within `timeout`."""
        end = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([self.conn], [], [], left)[0]:
                return None
            data = self.conn.recv(1 << 16)
            if not data:
                return b""
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            while data := f.read1(1 << 16):
                self.chunks[fd].append(data)

    def wait(self, timeout: float | None) -> int | None:
        """The exit status (-N for a signal), or None if it did not come within `timeout` seconds."""
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                return None
            if not line:  # the monitor died: treat as killed
                line = json.dumps({"returncode": -signal.SIGKILL}).encode()
            self.returncode = json.loads(line)["returncode"]
        return self.returncode

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def output(self, join_timeout: float | None) -> tuple[str, str]:
        for t in self.readers:  # grandchildren that kept the pipes open keep them open in a real run too
            t.join(join_timeout)
        self.conn.close()

        def decode(fd: int) -> str:  # what subprocess's text mode gives: universal newlines
            return b"".join(self.chunks[fd]).decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")

        return decode(self.fds[0]), decode(self.fds[1])


def run(argv: list[str], cwd: str | Path, env: dict[str, str], timeout: float | None = None,
        ) -> subprocess.CompletedProcess | None:
    """`subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`, forked from a
    warm zygote, for `[sys.executable, script, ...]` and `[sys.executable, "-m", module, ...]`. None if no zygote
    can serve it (the caller then runs the real process)."""
    if not _servable(argv) or (z := zygote(env)) is None:
        return None
    launch = _Launch(z, argv, cwd, env)
    deadline = None if timeout is None else time.monotonic() + timeout
    rc = launch.wait(timeout)
    if rc is None:  # timed out: kill like subprocess.run does, then report
        launch.signal(signal.SIGKILL)
        out, err = launch.output(10)
        raise subprocess.TimeoutExpired(argv, timeout, output=out, stderr=err)
    out, err = launch.output(None if deadline is None else max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(argv, rc, out, err)


def rank_env(env: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """What `accelerate launch --multi_gpu --num_processes N --mixed_precision no --dynamo_backend no` (torch
    elastic underneath) gives rank `rank` of a one-machine job, as terrascale's launcher hook runs it."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(nproc), "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
            "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
            "ACCELERATE_DYNAMO_USE_DYNAMIC": "False", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            # the hook marks its workers; no launcher is their parent here, so trainer.runtime.follow_launcher
            # (which checks the parent's pid) does nothing, as for any process a stale variable reached
            "TERRASCALE_LAUNCHER_PID": "0"}


def run_ranks(argv: list[str], cwd: str | Path, env: dict[str, str], nproc: int, port: int,
              timeout: float | None = None, grace: float = 30.0) -> subprocess.CompletedProcess | None:
    """`accelerate launch` of `argv` (`[sys.executable, script, ...]`) on `nproc` processes of this machine, each a
    warm child with its rank's environment (`rank_env`). As torch elastic does: when a rank fails, the others get
    SIGTERM, then SIGKILL after `grace` seconds; the exit code is the first failing rank's (a rank that died of
    SIGTERM counts last: it was stopped because of another), 0 if all succeed. Output: each rank's stdout and
    stderr, rank 0 first. None if no zygote can serve it."""
    if not _servable(argv) or (z := zygote(env)) is None:
        return None
    launches = [_Launch(z, argv, cwd, rank_env(env, rank, nproc, port)) for rank in range(nproc)]
    deadline = None if timeout is None else time.monotonic() + timeout
    failed: list[tuple[bool, float, int, int]] = []  # (died of SIGTERM, when, rank, code)
    stop_at = None
    while any(x.returncode is None for x in launches):
        for rank, x in enumerate(launches):
            if x.returncode is None and x.wait(0.05) is not None and x.returncode != 0:
                failed.append((x.returncode == -signal.SIGTERM, time.monotonic(), rank, x.returncode))
        now = time.monotonic()
        if failed and stop_at is None:  # elastic stops the others
            for x in launches:
                if x.returncode is None:
                    x.signal(signal.SIGTERM)
            stop_at = now + grace
        if (stop_at is not None and now > stop_at) or (deadline is not None and now > deadline):
            for x in launches:
                if x.returncode is None:
                    x.signal(signal.SIGKILL)
            if deadline is not None and now > deadline and not failed:
                outs = [x.output(10) for x in launches]
                raise subprocess.TimeoutExpired(argv, timeout, output="".join(o for o, _ in outs),
                                                stderr="".join(e for _, e in outs))
    outs = [x.output(None if deadline is None else max(1.0, deadline - time.monotonic())) for x in launches]
    rc = min(failed)[3] if failed else 0
    if rc < 0:  # a shell reports a death by signal N as 128 + N, as the launcher hook does
        rc = 128 - rc
    return subprocess.CompletedProcess(argv, rc, "".join(o for o, _ in outs), "".join(e for _, e in outs))


if __name__ == "__main__":
    serve(sys.argv[1])
