"""Benchmarks, results written to files: `python launch/bench.py overhead [--config X.yaml] [key=value ...]`."""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("bench")
