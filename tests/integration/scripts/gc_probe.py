"""`python gc_probe.py <launch/train.py arguments>`: runs `launch/train.py`'s entry and prints, as JSON, the cyclic
garbage collector's state at the entry of `trainer.cli.main` and at the first training step."""
import gc
import json

from trainer import cli
from trainer.train import loop

seen = {}
real_main, real_train = cli.main, loop.train


def main(argv):
    seen.update(paused_at_entry=not gc.isenabled(), frozen_at_entry=gc.get_freeze_count())
    return real_main(argv)


def train(parts, progress):
    seen.update(enabled_in_loop=gc.isenabled(), frozen_in_loop=gc.get_freeze_count())
    return real_train(parts, progress)


cli.main, loop.train = main, train
try:
    cli.run_launcher("train")
finally:
    print(json.dumps(seen), flush=True)
