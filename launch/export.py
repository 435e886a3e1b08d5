"""Export a job's weights from a checkpoint: `python launch/export.py --job runs/x [--checkpoint DIR]`."""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("export")
