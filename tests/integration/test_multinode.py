"""Two "nodes" on one machine, and a change of world size through DeepSpeed's universal checkpoint.

The first run is two nodes, each its own `accelerate launch` (static rendezvous on 127.0.0.1, one process per
node, gloo), started from the shipped CPU config: the same command line a SLURM job runs per node. Under ZeRO-3 +
CPU offload: train → stop → resume with the same 2 processes → convert with `terrascale universal` → resume with
1 process, which first must restore exactly the weights (and BatchNorm buffers) the 2 ranks saved, then train on.
"""
from __future__ import annotations

import math
import subprocess

import pytest
import torch

from tests.integration.helpers import BIN, ROOT, TINY, check, env, free_port, load_export, metrics, run_python, run_train

ACCEL_CPU_2PROC = ROOT / "launch/configs/accelerate/cpu_2proc.yaml"


def _node_cmd(rank: int, port: int, overrides: list[str]) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ACCEL_CPU_2PROC), "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), str(ROOT / "launch/train.py"),
            "--config", str(ROOT / "launch/configs/demo.yaml"), *overrides]


def run_two_nodes(overrides: list[str], logs, timeout: int = 600) -> list[str]:
    """Both nodes at once; output goes to files (a full pipe would block one node inside a collective)."""
    port = free_port()
    procs, files = [], []
    for rank in (0, 1):
        out = open(logs / f"node{rank}.log", "w")
        files.append(out)
        procs.append(subprocess.Popen(_node_cmd(rank, port, overrides), cwd=ROOT, env=env(), stdout=out,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
    texts = [(logs / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], f"exit codes {codes}\nNODE 0:\n{texts[0][-6000:]}\nNODE 1:\n{texts[1][-3000:]}"
    return texts


@pytest.mark.slow
def test_two_nodes_zero3_then_universal_resume_on_one(tmp_path):
    job = tmp_path / "job"
    base = [*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=zero3_offload", f"checkpoint.dir={job}"]
    ckpts = job / "checkpoints"

    # 2 nodes x 1 process: train, stop at step 2
    run_two_nodes([*base, "run.stop_at_step=2"], tmp_path)
    step2 = ckpts / "step-000002"
    shards = sorted(p.name for p in (step2 / "pytorch_model").glob("*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (step2 / "rng_state_1.safetensors").is_file()

    # same world size: resumes, stops at step 3. Two ranks of one machine (warm children with the environment
    # accelerate gives its workers): the launch across nodes is the first run's; here what counts is the resume
    # of the 2 ranks' shards by 2 ranks
    r = check(run_train([*base, "run.stop_at_step=3"], nproc=2))
    assert "resumed from" in r.stderr and "step-000002" in r.stderr
    step3 = ckpts / "step-000003"
    assert '"world_size": 2' in (step3 / "progress.json").read_text()

    # convert with the CLI
    r = run_python(["-m", "trainer", "universal", step3], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (step3 / "universal" / "COMPLETE").is_file() and (step3 / "universal" / "latest_universal").is_file()

    # 1 process, no step left to train: the export holds exactly what the 2 ranks saved (rank 0's buffers)
    r = check(run_train([*base, "run.max_steps=3"]))
    assert "loaded universal checkpoint" in r.stderr and "written by 2 process(es), now 1" in r.stderr
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(step3), tag="pytorch_model")
    restored = load_export(job)
    assert saved.keys() == restored.keys() and any("running_mean" in k for k in saved)
    for k in saved:
        assert torch.equal(restored[k].float(), saved[k].float()), k

    # 1 process trains on from step 3 to 6
    r = check(run_train(base))
    assert "resumed from" in r.stderr and "step-000003" in r.stderr
    train = metrics(job)
    assert [x["step"] for x in train] == list(range(1, 7))
    assert all(math.isfinite(x["loss"]) for x in train)
    assert '"world_size": 1' in (ckpts / "step-000006" / "progress.json").read_text()
    moved = load_export(job)
    assert any(not torch.equal(moved[k], restored[k]) for k in restored), "resumed run did not train"
