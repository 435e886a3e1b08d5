"""A training process runs its start-up with the cyclic garbage collector paused and trains with it running again,
start-up's objects frozen (`trainer.runtime.pause_gc_for_start_up` / `gc_after_start_up`)."""
from __future__ import annotations

import json

from tests.integration.helpers import ROOT, TINY, run_python


def test_train_pauses_the_collector_through_start_up_and_trains_with_it_running(tmp_path):
    r = run_python([ROOT / "tests/integration/scripts/gc_probe.py", "--config", ROOT / "launch/configs/demo.yaml",
                    *TINY, "run.max_steps=1", "memory.profile=full", f"data.root={tmp_path / 'data'}",
                    f"checkpoint.dir={tmp_path / 'job'}"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["paused_at_entry"] and seen["enabled_in_loop"], seen
    assert seen["frozen_in_loop"] > seen["frozen_at_entry"], seen  # what start-up built is frozen
