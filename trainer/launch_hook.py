"""Make `accelerate launch launch/train.py ...` behave like `python launch/train.py ...`.

Accelerate's launcher stands between the shell and the training processes, and out of the box it
- turns a training exit code 2 into its own exit 1 plus a `CalledProcessError` traceback (one process), or a
  `ChildFailedError` traceback (torch elastic, `--multi_gpu`);
- dies on SIGTERM while the training process, orphaned, keeps running (one process), or exits before the
  checkpoint is written and SIGKILLs the workers after 30 s (torch elastic);
- with everything in one process group, a Ctrl-C reaches training twice (directly and forwarded), which is the
  "abort now" gesture.

`bash launch/setup.sh` installs `terrascale_accelerate_hook.pth` into the venv (`python -m trainer.launch_hook
install`). Python runs it at every start; it only acts inside `accelerate launch` / `accelerate-launch`, where it
patches `accelerate.commands.launch` when that module is imported, and only for scripts that are terrascale entry
points (they import `trainer.cli`). Then:
- the training processes run in their own process group (elastic workers already do), so a signal sent to the
  launcher, to its group or by the terminal reaches each of them exactly once: the launcher forwards SIGTERM /
  SIGINT and keeps waiting, without a deadline, while they save a checkpoint at the next step boundary;
- the launcher exits with the training exit code (2 stays 2; the first failing rank's code with several
  processes; 128+N for a rank killed by signal N), with no traceback;
- the training processes see `TERRASCALE_LAUNCHER_PID` and ask the kernel to SIGTERM them if the launcher dies
  (`trainer.runtime.follow_launcher`): even a SIGKILLed launcher leaves no orphan training on.

This module is imported by that `.pth` at every interpreter start: standard library only at module level.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

TARGET = "accelerate.commands.launch"
PID_ENV = "TERRASCALE_LAUNCHER_PID"
PTH_NAME = "terrascale_accelerate_hook.pth"
# An import error (terrascale uninstalled, repo moved) must not break every Python start of the venv.
PTH_LINE = ("import sys; exec('try:\\n import trainer.launch_hook as _h\\nexcept ImportError:\\n pass\\n"
            "else:\\n _h.activate()')\n")
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def _is_accelerate_launch(argv: list[str], orig_argv: list[str]) -> bool:
    name = Path(argv[0]).name if argv else ""
    if name == "accelerate-launch":
        return True
    if name == "accelerate":
        return len(argv) > 1 and argv[1] == "launch"
    return TARGET in orig_argv  # python -m accelerate.commands.launch


def activate() -> None:
    if not _is_accelerate_launch(sys.argv, getattr(sys, "orig_argv", [])):
        return
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        patch(module)


def is_terrascale_script(args) -> bool:
    if getattr(args, "module", False) or getattr(args, "no_python", False):
        return False
    try:
        head = Path(args.training_script).read_text(errors="replace")[:8000]
    except OSError:
        return False
    return "trainer.cli" in head


def patch(module) -> None:
    simple, multi = module.simple_launcher, module.multi_gpu_launcher

    def simple_launcher(args):
        return run_simple(module, args) if is_terrascale_script(args) else simple(args)

    def multi_gpu_launcher(args):
        return run_multi(multi, args) if is_terrascale_script(args) else multi(args)

    module.simple_launcher, module.multi_gpu_launcher = simple_launcher, multi_gpu_launcher


def shell_code(returncode: int) -> int:
    """A process killed by signal N reports -N; a shell reports 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class _Forwarder:
    """SIGTERM/SIGINT to the launcher go to every training process; the launcher keeps waiting."""

    def __init__(self, pids) -> None:
        self.pids = pids
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_Forwarder":
        for sig in FORWARDED:
            self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum, frame) -> None:
        pids = self.pids()
        if not pids:  # nothing started yet (rendezvous): nothing to save, stop the launcher as usual
            signal.signal(signum, self.previous[signum])
            os.kill(os.getpid(), signum)
            return
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        print(f"terrascale launcher: {signal.Signals(signum).name} forwarded to {len(pids)} training process(es); "
              "waiting for them to checkpoint and exit", file=sys.stderr, flush=True)


def run_simple(module, args) -> None:
    cmd, env = module.prepare_simple_launcher_cmd_env(args)
    env[PID_ENV] = str(os.getpid())
    # Own process group: a terminal's Ctrl-C or a kill of the launcher's group reaches training once, forwarded.
    # The forwarder must be in place before the child exists: a SIGTERM between the fork and the handler would kill
    # the launcher and leave training running. The signals wait (blocked) until both are there; the child starts
    # with them unblocked.
    procs: list[subprocess.Popen] = []
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        with _Forwarder(lambda: [p.pid for p in procs if p.poll() is None]):
            procs.append(subprocess.Popen(cmd, env=env, process_group=0,
                                          preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            code = procs[0].wait()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    sys.exit(shell_code(code))


def _child_pids() -> list[int]:
    import psutil  # an Accelerate dependency

    return [c.pid for c in psutil.Process().children() if c.is_running()]


def first_failure_code(failures: dict) -> tuple[int, str]:
    """Exit code of the rank that failed first (the root cause; the others were stopped because of it).

    Elastic stamps failures in whole seconds, so the failing rank and the ranks it then SIGTERMs often tie. A
    rank that died of SIGTERM was stopped by elastic (a user's SIGTERM is forwarded and ends in a checkpoint and
    exit 0), so it is the root cause only when nothing else failed.
    """
    def order(kv):
        rank, failure = kv
        return (failure.exitcode == -signal.SIGTERM, failure.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    code = shell_code(failure.exitcode)
    note = ""
    if failure.exitcode < 0:
        note = (f"terrascale launcher: rank {rank} (pid {failure.pid}) was killed by "
                f"{signal.Signals(-failure.exitcode).name}" + (" (out of memory?)" if failure.exitcode == -9 else ""))
    return code, note


def run_multi(multi, args) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torch elastic would SIGTERM the workers itself and SIGKILL them 30 s later: we forward instead and let
    # elastic watch the workers finish. It keeps SIGHUP/SIGQUIT (its own shutdown).
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    os.environ[PID_ENV] = str(os.getpid())
    with _Forwarder(_child_pids):
        try:
            multi(args)
        except ChildFailedError as e:
            code, note = first_failure_code(e.failures)
            if note:
                print(note, file=sys.stderr, flush=True)
            sys.exit(code)


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def install() -> Path:
    path = pth_path()
    if not path.is_file() or path.read_text() != PTH_LINE:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(PTH_LINE)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m trainer.launch_hook install")
    print(f"[setup] accelerate launch hook: {install()}")
