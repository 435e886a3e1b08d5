"""Trace results cached on disk, keyed by everything that changes them.

A trace is deterministic given the architecture, the input shape, the dtype policy, checkpointing, LoRA
settings and the library versions, so its result is stored once under a hash of those (plus `TRACE_VERSION`,
bumped whenever the tracing code changes what it measures). Two places are read:

- the user cache, `$TERRASCALE_CACHE/planner` (default `~/.cache/terrascale/planner`), one JSON file per key,
  written atomically (several processes may plan at once);
- the seed shipped with the package, `plan_cache_seed.json`, written by `fit_table.py` for the representative
  experiments of `docs/fit_table.md`, so a fresh clone plans those (and any config with the same shapes)
  without importing TerraTorch for the decoder measurement. `TERRASCALE_PLAN_SEED=off` ignores it.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

TRACE_VERSION = 1
SEED_PATH = Path(__file__).with_name("plan_cache_seed.json")


def cache_dir() -> Path:
    root = os.environ.get("TERRASCALE_CACHE") or Path.home() / ".cache" / "terrascale"
    return Path(root) / "planner"


def key_of(spec: dict[str, Any]) -> str:
    blob = json.dumps({"v": TRACE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@lru_cache(maxsize=1)
def _seed() -> dict[str, Any]:
    if os.environ.get("TERRASCALE_PLAN_SEED", "on") == "off":  # benchmarks of the cold path
        return {}
    try:
        return json.loads(SEED_PATH.read_text())
    except FileNotFoundError:
        return {}


def get(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())["value"]
    except FileNotFoundError:
        pass
    except (json.JSONDecodeError, KeyError):  # a torn or foreign file: measure again
        pass
    entry = _seed().get(key)
    return None if entry is None else entry["value"]


def put(key: str, spec: dict[str, Any], value: dict[str, Any]) -> None:
    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"spec": spec, "value": value}, default=str))
    tmp.replace(path)
    USED[key] = {"spec": spec, "value": value}


# Every entry read or written in this process, so `fit_table.py` can write the seed from what it used.
USED: dict[str, dict[str, Any]] = {}


def remember(key: str, spec: dict[str, Any], value: dict[str, Any]) -> None:
    USED[key] = {"spec": spec, "value": value}


def write_seed(entries: dict[str, dict[str, Any]]) -> Path:
    """Values only, one per line: the specs (whole model configs) stay in the user cache."""
    lines = [f"{json.dumps(k)}: {json.dumps({'value': v['value']}, default=str)}" for k, v in sorted(entries.items())]
    SEED_PATH.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    _seed.cache_clear()
    return SEED_PATH


def cached(spec: dict[str, Any], compute) -> tuple[dict[str, Any], bool]:
    """(value, was_cached): the stored result for `spec`, or `compute()`'s, stored.

    A RuntimeError from `compute` (an op the model cannot run that way: Clay under bf16 weights, Granite's MoE
    under fp32) is as deterministic as a result for the same spec, so it is stored too and raised again on a hit:
    a warm plan does not rebuild the model (and import TerraTorch) only to fail the same way."""
    key = key_of(spec)
    value = get(key)
    hit = value is not None
    if not hit:
        try:
            value = compute()
        except RuntimeError as e:
            value = {ERROR: str(e)}
        put(key, spec, value)
    remember(key, spec, value)
    if ERROR in value:
        raise RuntimeError(value[ERROR])
    return value, hit


ERROR = "cannot_run"  # the key of a stored failure; a measured value never has it
