"""Benchmark report (throughput, peak memory, planner prediction per backbone × profile): see --help."""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("bench-report")
