"""A large-width InternVL2-40B-class checkpoint loads with bounded memory and trains one step, per profile.

Synthetic bf16 checkpoints (sharded safetensors + index + config.json, written tensor by tensor by
`trainer.backbones.synth_checkpoint`) go through the real entry point `python launch/train.py` with
qlora (native layout) and zero3_offload_lora (OpenGVLab's remote layout, fused InternViT qkv). Checked:
the step runs; the peak RSS while loading, above the RSS right before the load started (from load.json's
timings and a 50 ms psutil trace), stays under a bound with a wide margin over the issue's targets
(qlora 0.6, zero3_offload_lora 2.3 B/param) yet far under what loading cost before (6-9 B/param:
random-init fp32 build, whole checkpoint read beside it); and the exported weights equal the written
ones (exactly for bf16 weights, within NF4's error for 4-bit ones), read from the merged export `terrascale export
--merge` writes (the job's own small export holds no base weights: adapters, neck, decoder, head).

Size: InternVL2-40B's structure (25 vision heads, 56:8 GQA, MLP ratios, qk-norm, projector) at half
width (vision 1600, LLM 3584), 1 vision + 1 LLM layer: 0.21B parameters. Depth 1 at full width is 0.83B,
whose bf16 step, NF4 quantization and fp32 export take minutes on a 2-core CPU; the loader's cost is per
tensor, so bytes/param do not depend on width (`python launch/bench.py load` measures full width).
"""
from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from safetensors.torch import load_file

from trainer.backbones import synth_checkpoint
from trainer.bench import bench_load

WIDTH_DIVISOR = 2
# Peak B/param above the pre-load RSS at this small size (0.21B parameters, one layer per stack). qlora's peak here
# is dominated by bitsandbytes' CPU quantizer scratch for the largest single tensor (measured 3.8 B/param; 0.9
# B/param stays after the load), which does not grow with depth; the old loader (fp32 build + whole checkpoint
# beside it) took 10 B/param at real width. The per-parameter slope is `launch/bench.py load`'s job.
BOUND = {"qlora": 5.0, "zero3_offload_lora": 4.0}
CASES = [("qlora", "native"), ("zero3_offload_lora", "remote")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigload")
    out = {}
    for _, layout in CASES:
        out[layout] = synth_checkpoint.write_checkpoint(root / layout, 1, 1, layout, width_divisor=WIDTH_DIVISOR,
                                                        shard_bytes=128 << 20)
        out[layout]["dir"] = root / layout
    return out


def _our_name(export_key: str) -> str | None:
    """Export key → the checkpoint's native (save_pretrained) name, or None for parts not in a checkpoint."""
    if ".lora_" in export_key or not export_key.startswith("encoder."):
        return None
    k = export_key.removeprefix("encoder.").replace("base_model.model.", "").replace(".base_layer.", ".")
    if not k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
        return None
    return re.sub(r"^language_model\.", "language_model.model.", k)


def _compare_export(job, info, quantized: bool) -> int:
    """Every merged backbone weight the checkpoint provides equals the written value (LoRA-adapted ones within the
    adapters' small delta after one step); returns the count compared exactly or within NF4's error."""
    from tests.integration.helpers import run_python

    native = {s.name: s.shape for s in synth_checkpoint.native_specs(
        synth_checkpoint.config_for("internvl2_40b", 1, 1, info["vocab"], WIDTH_DIVISOR))}
    small = load_file(str(job / "export" / "model.safetensors"))
    assert not [k for k in small if _our_name(k) in native], "the small export repeats base weights"
    r = run_python(["-m", "trainer", "export", "--job", str(job), "--merge"], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    state = load_file(str(job / "export" / "model.merged.safetensors"))
    compared, adapted = 0, 0
    for key, value in state.items():
        name = _our_name(key)
        if name not in native:
            continue
        want = synth_checkpoint.expected(name, native[name]).float()
        got = value.float()
        assert got.shape == want.shape, f"{key}: {tuple(got.shape)} vs written {tuple(want.shape)}"
        if quantized and got.dim() == 2 and got.numel() >= 4096:
            # NF4 (blocks of 64) keeps ~10 % relative error on Gaussian weights; a wrong tensor is ~140 %
            err = (got - want).norm() / want.norm()
            assert err < 0.2, f"{key}: relative error {err:.3f} vs the written weight"
        elif not torch.equal(got.to(torch.bfloat16), want.to(torch.bfloat16)):
            err = (got - want).norm() / want.norm()  # a LoRA target: base + B·A after one step
            assert got.dim() == 2 and err < 0.01, f"{key} differs from the checkpoint (relative error {err:.4f})"
            adapted += 1
            continue
        compared += 1
    return compared


@pytest.mark.parametrize("profile,layout", CASES)
def test_big_checkpoint_loads_within_memory_bound_and_trains(tmp_path, checkpoints, profile, layout):
    info = checkpoints[layout]
    job = tmp_path / "job"
    args = bench_load.overrides(job, tmp_path / "data", profile, 1, info["dir"], image_size=56)
    args = [a for a in args if not a.startswith("checkpoint.export")] + ["checkpoint.export=true"]
    t0 = time.perf_counter()
    r = bench_load.run_once(args, job, timeout=900, log_path=tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text(errors="replace")
    assert r["exit_code"] == 0, log[-6000:]
    print(f"{profile}/{layout}: {time.perf_counter() - t0:.0f} s, params {info['params_used'] / 1e9:.3f}B")

    losses = [row["loss"] for row in map(json.loads, (job / "metrics.jsonl").read_text().splitlines())
              if row["split"] == "train"]
    assert losses and all(math.isfinite(x) for x in losses)

    load = r.get("load")
    assert load is not None, "the loader wrote no load.json"
    for key in ("build", "read", "place", "quantize"):
        assert key in load["seconds"]
    # every backbone tensor read once, in bf16; the LM head and text embeddings never read
    assert load["tensors"] == info["tensors_used"]
    assert load["params"] == info["params_used"] and load["bytes_read"] == 2 * info["params_used"]

    base, peak = r["pre_load_bytes"], r["peak_load_bytes"]
    assert base is not None and peak is not None
    per_param = (peak - base) / info["params_used"]
    shard = max(p.stat().st_size for p in info["dir"].glob("*.safetensors"))
    allowed = BOUND[profile] * info["params_used"] + shard
    print(f"  peak while loading {peak / 1e9:.2f} GB, {base / 1e9:.2f} GB before: {per_param:.2f} B/param "
          f"(bound {allowed / info['params_used']:.2f} incl. one {shard / 1e6:.0f} MB shard)")
    assert peak - base <= allowed, f"{profile}: loading took {per_param:.2f} B/param above the pre-load RSS"

    assert _compare_export(job, info, quantized=profile == "qlora") >= 20
