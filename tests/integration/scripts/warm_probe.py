"""Prints what a launched script sees of its process (for tests/integration/test_warm.py), then exits with argv[1]."""
import json
import os
import random
import signal
import sys

import numpy as np
import torch

print("to stderr", file=sys.stderr)
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "main": __name__,
    "env": os.environ.get("WARM_PROBE"), "omp": os.environ.get("OMP_NUM_THREADS"),
    "torch_seed": torch.initial_seed(), "torch_rand": torch.rand(3).tolist(), "torch_threads": torch.get_num_threads(),
    "random": random.random(), "numpy": float(np.random.random()),
    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    "stdin_empty": sys.stdin.read() == "",
}))
if sys.argv[1] == "sleep":
    import time

    time.sleep(120)
if sys.argv[1] == "rank-exit":  # rank 1 fails at once, rank 0 would wait for it forever (a collective)
    import time

    if os.environ["RANK"] == "1":
        print("rank 1 exits 2", file=sys.stderr, flush=True)
        sys.exit(2)
    print("rank 0 waits", file=sys.stderr, flush=True)
    time.sleep(600)
if sys.argv[1] == "raise":
    raise RuntimeError("probe failed on purpose")
sys.exit(int(sys.argv[1]))
