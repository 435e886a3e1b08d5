"""One run per job dir: `<job dir>/job.lock`, held with `fcntl.flock` for the life of the run.

The kernel releases a flock when its holder exits, however it exits (SIGKILL, OOM, a node reboot on a local
disk), so a lock left behind by a dead run never blocks the next one; the file's content (pid, host, start) only
names the holder in the message. Only the global rank 0 takes it: one holder per job whatever the number of
processes or nodes (two "nodes" on one machine share the file; their other ranks never touch it). On NFS, Linux
maps flock onto NFS byte-range locks, so nodes sharing the job dir see each other's lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from trainer.errors import TerrascaleError

LOCK_NAME = "job.lock"


class JobDirBusy(TerrascaleError):
    """Another run holds the job dir."""

    exit_code = 2


class JobLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _describe(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


def acquire(job_dir: Path, rank: int | None = None) -> JobLock | None:
    """Take the job dir's lock on the global rank 0 (None elsewhere); JobDirBusy names the holder."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return None
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _describe(path)
        raise JobDirBusy(f"checkpoint.dir {job_dir} is in use by another run ({holder}): wait for it to finish, "
                         "stop it (SIGTERM saves a checkpoint first), or set checkpoint.dir to another folder")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
    return JobLock(path, fd)
