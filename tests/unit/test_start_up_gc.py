"""Which entries pause the cyclic garbage collector for start-up, and what `gc_after_start_up` does. Each case runs
in a fresh interpreter: the test process's own collector stays as it is."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import gc, json, sys
import trainer.cli as cli
seen = {}


def main(argv=None):
    seen["paused"] = not gc.isenabled()
    return 0


cli.main = main
entry, command = sys.argv[1:3]
try:
    if entry == "launcher":
        cli.run_launcher(command)
    else:
        sys.argv = ["terrascale", command]
        cli.entry()
except SystemExit:
    pass
print(json.dumps(seen))
"""


def _paused(entry: str, command: str) -> bool:
    r = subprocess.run([sys.executable, "-c", PROBE, entry, command], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["paused"]


@pytest.mark.parametrize("entry", ["launcher", "terrascale"])
def test_train_and_predict_start_with_the_collector_paused_other_commands_not(entry):
    assert _paused(entry, "train") and _paused(entry, "predict")
    assert not _paused(entry, "plan") and not _paused(entry, "export")


def test_after_start_up_the_collector_runs_again_with_start_up_frozen():
    code = """
import gc, json
from trainer.runtime import gc_after_start_up, pause_gc_for_start_up
gc_after_start_up()  # not paused: nothing to do
untouched = (gc.isenabled(), gc.get_freeze_count())
pause_gc_for_start_up("train")
paused = gc.isenabled()
kept = [[i] for i in range(1000)]  # start-up's long-lived objects
gc_after_start_up()
print(json.dumps([untouched, paused, gc.isenabled(), gc.get_freeze_count()]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (enabled, frozen_before), paused, enabled_after, frozen = json.loads(r.stdout)
    assert enabled and frozen_before == 0 and not paused
    assert enabled_after and frozen >= 1000
