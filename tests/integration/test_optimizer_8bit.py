"""memory.optimizer: adamw_8bit through the real entry point on CPU (bitsandbytes' CPU backend runs AdamW8bit).

- A tiny LoRA run trains with it and its checkpoint (Accelerate save_state) holds 8-bit moments.
- Resume by equality: a run stopped half-way and resumed equals the straight run (loss per step, final
  weights). Profile full: the lora profile does not resume bit-exactly even with torch's AdamW (measured:
  loss differs by ~1e-3 at step 6), which would hide whether the 8-bit states come back exactly.
"""
from __future__ import annotations

import torch
from torch.testing import assert_close

from tests.integration.helpers import TINY, check, load_export, metrics, run_train


def _moment_dtypes(job, step: str) -> list[torch.dtype]:
    state = torch.load(job / "checkpoints" / step / "optimizer.bin", weights_only=False)["state"]
    # bitsandbytes nests its quantized moments under this key in state_dict(); fp32 ones (small tensors) stay flat
    return [s.get("__bnb_optimizer_quant_state__", s)["state1"].dtype for s in state.values()]


def test_lora_trains_with_8bit_adamw(tmp_path):
    job = tmp_path / "lora"
    check(run_train([*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=lora", "memory.optimizer=adamw_8bit",
                     "run.max_steps=4", f"checkpoint.dir={job}"]))
    assert torch.uint8 in _moment_dtypes(job, "step-000004"), "no 8-bit moments in the checkpoint"
    losses = [r["loss"] for r in metrics(job)]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_8bit_adamw_resumes_exactly(tmp_path):
    data = [f"data.root={tmp_path / 'data'}", "memory.profile=full", "memory.optimizer=adamw_8bit"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check(run_train([*TINY, *data, f"checkpoint.dir={straight}"]))
    check(run_train([*TINY, *data, f"checkpoint.dir={resumed}", "run.stop_at_step=3"]))
    assert torch.uint8 in _moment_dtypes(resumed, "step-000003")
    r = check(run_train([*TINY, *data, f"checkpoint.dir={resumed}"]))
    assert "resumed from" in r.stderr and "step-000003" in r.stderr

    a, b = metrics(straight), metrics(resumed)
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 7))
    assert_close(torch.tensor([x["loss"] for x in b]), torch.tensor([x["loss"] for x in a]), rtol=1e-5, atol=1e-6)
    wa, wb = load_export(straight), load_export(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert a[-1]["loss"] < a[0]["loss"], "the run did not train"


def test_8bit_states_under_deepspeed_exit_2_before_anything_is_trained(tmp_path):
    """The run's DeepSpeed check refuses them (the planner's refusal too): exit 2 naming memory.optimizer, no
    checkpoint, no metrics."""
    job = tmp_path / "zero2"
    r = run_train([*TINY, f"data.root={tmp_path / 'data'}", "memory.profile=zero2", "memory.optimizer=adamw_8bit",
                   "run.max_steps=2", f"checkpoint.dir={job}"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "memory.optimizer: 'adamw_8bit' cannot run under DeepSpeed" in r.stderr and "Traceback" not in r.stderr
    assert not (job / "checkpoints").exists() and not (job / "metrics.jsonl").exists()
