"""Run experiments one after another as resumable jobs: `python launch/sweep.py matrix.yaml [key=value ...]`.

`--help` shows the matrix format. Killing the sweep and running it again skips finished jobs.
"""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("sweep")
