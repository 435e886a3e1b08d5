"""Will it fit? `python launch/plan.py --config X.yaml [--gpu-memory 24GiB] [--cpu-memory 64GiB] [--nvme PATH] [--json]`.

`python launch/plan.py --fit-table docs/fit_table.md` regenerates the fit table. `--help` lists the options.
"""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("plan")
