"""Launch configs: every shipped Accelerate config loads with Accelerate's own parser and leaves DeepSpeed to the
memory profile; the DeepSpeed hostfile parses with DeepSpeed's; the SLURM template, run with stand-in `srun` /
`scontrol` / `accelerate`, starts one `accelerate launch` per node with the right rank and rendezvous, and
requeues the job when stopped before the time limit."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ACCEL = sorted((ROOT / "launch" / "configs" / "accelerate").rglob("*.yaml"))
# Accelerate refuses these beside a DeepSpeed config handed to it in code (DeepSpeedPlugin._deepspeed_config_checks)
DS_OWNED = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
            "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path", "zero3_save_16bit_model"}


def test_accelerate_configs_are_discovered():
    names = {p.name for p in ACCEL}
    assert {"cpu.yaml", "cpu_2proc.yaml", "one_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"} <= names


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
def test_accelerate_config_loads_and_leaves_deepspeed_to_the_profile(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert not cfg.use_cpu, "--cpu is rejected together with DeepSpeed"
    assert cfg.num_processes >= cfg.num_machines >= 1
    if raw["distributed_type"] == "DEEPSPEED":
        assert not DS_OWNED & set(raw.get("deepspeed_config", {})) and "mixed_precision" not in raw
        assert (ROOT / raw["deepspeed_config"]["deepspeed_hostfile"]).is_file()
    else:
        assert raw["distributed_type"] in ("NO", "MULTI_GPU") and raw["mixed_precision"] == "no"


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(ROOT / "launch" / "configs" / "deepspeed_hostfile.example"))) == {
        "node-01": 8, "node-02": 8}


def _fake_cluster(tmp_path: Path, srun_body: str) -> dict[str, str]:
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv.mkdir(parents=True)
    scripts = {
        bin_dir / "scontrol": f'#!/bin/bash\nif [ "$1" = show ]; then printf "gpu-a\\ngpu-b\\n"; '
                              f'else echo "$@" >> {tmp_path}/scontrol.log; fi\n',
        bin_dir / "srun": f"#!/bin/bash\n{srun_body}\n",
        venv / "accelerate": f'#!/bin/bash\necho "$SLURM_NODEID $*" >> {tmp_path}/launch.log\n',
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", VENV=str(tmp_path / "venv"), GPUS_PER_NODE="4", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="1234")
    return env


def test_sbatch_starts_one_launch_per_node(tmp_path):
    # srun runs its command once per node, with that node's SLURM_NODEID
    env = _fake_cluster(tmp_path, 'for n in 0 1; do SLURM_NODEID=$n "${@:2}"; done')
    r = subprocess.run(["bash", str(ROOT / "launch/configs/slurm/train.sbatch"), "--config", "x.yaml", "optim.lr=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (tmp_path / "launch.log").read_text().splitlines()
    common = ("launch --config_file launch/configs/accelerate/multi_node.yaml --num_machines 2 --num_processes 8 "
              "--machine_rank {n} --main_process_ip gpu-a --main_process_port 29734 launch/train.py --config x.yaml "
              "optim.lr=1 checkpoint.resume=auto")
    assert lines == [f"{n} " + common.format(n=n) for n in (0, 1)]
    assert not (tmp_path / "scontrol.log").exists(), "a finished job must not be requeued"


def test_sbatch_passes_the_time_limit_signal_on_and_requeues(tmp_path):
    # srun that behaves like a training step: runs until SIGTERM, then exits 0 (checkpoint saved)
    env = _fake_cluster(tmp_path, f'trap "echo saved >> {tmp_path}/srun.log; exit 0" TERM\n'
                                  f'touch {tmp_path}/started\nwhile :; do sleep 0.1; done')
    proc = subprocess.Popen(["bash", str(ROOT / "launch/configs/slurm/train.sbatch"), "--config", "x.yaml"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends to the batch script
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert (tmp_path / "srun.log").read_text() == "saved\n"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 1234\n"
