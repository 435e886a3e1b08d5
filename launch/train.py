"""Train an experiment: `accelerate launch launch/train.py --config launch/configs/X.yaml [key=value ...]`.

Also runs as plain `python launch/train.py ...` (one process). `--help` lists the options.
"""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("train")
