"""Errors a user can act on.

Each carries a message that names the file or config key at fault and the fix. The launchers turn
them into a message on stderr and an exit code (2 for bad input) instead of a traceback.
"""
from __future__ import annotations

import os
import sys


class TerrascaleError(Exception):
    """Base of every error terrascale raises on purpose; `exit_code` is what the launcher returns."""

    exit_code = 1


class ConfigError(TerrascaleError):
    """One or more problems in an experiment config, all collected before raising."""

    exit_code = 2

    def __init__(self, issues: list[str] | str, source: str | None = None, note: str | None = None):
        self.issues = [issues] if isinstance(issues, str) else list(issues)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.issues)} problem(s){where}:"] + [f"  - {i}" for i in self.issues]
        if note:
            lines.append(note)
        super().__init__("\n".join(lines))


class PlanError(TerrascaleError):
    """The memory plan cannot be satisfied (no profile fits, or a refused combination)."""

    exit_code = 2


class DataError(TerrascaleError):
    """Input data is missing, unreadable or inconsistent; the message names the path."""

    exit_code = 2


class CheckpointError(TerrascaleError):
    """A checkpoint cannot be found, read or written."""

    exit_code = 1


def report_error(err: TerrascaleError) -> None:
    """How every entry point prints an error it exits on (stderr; the rank when it is not 0)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}terrascale: error: {err}", file=sys.stderr)
