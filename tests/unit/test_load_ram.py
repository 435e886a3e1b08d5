"""CPU RAM at load: the checkpoint's numbers from its safetensors headers, and what each profile keeps on the CPU."""
from __future__ import annotations

import types

import pytest
import torch

from trainer.memory import states as st
from trainer.plan import load_ram as lr


@pytest.fixture
def shards(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(64, 32, dtype=torch.bfloat16), "a.step": torch.zeros(3, dtype=torch.int64)},
              tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(16, 16, dtype=torch.bfloat16), "b.norm": torch.zeros(16)},
              tmp_path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_header_reader_agrees_with_safetensors(shards):
    from safetensors import safe_open

    for path in shards.glob("*.safetensors"):
        header = lr.read_header(path)
        with safe_open(str(path), "pt") as f:
            assert set(header) - {"__metadata__"} == set(f.keys())
            for name in f.keys():
                t = f.get_tensor(name)
                assert header[name]["shape"] == list(t.shape)
                start, end = header[name]["data_offsets"]
                assert end - start == t.numel() * t.element_size()


def test_checkpoint_numbers_come_from_the_shards(shards):
    ck = lr.from_safetensors(shards)
    sizes = [p.stat().st_size for p in shards.glob("*.safetensors")]
    assert (ck.shard_bytes, ck.total_bytes, ck.dtype_bytes) == (max(sizes), sum(sizes), 2)  # bf16 holds most bytes
    assert lr.from_safetensors(shards / "model-00002-of-00002.safetensors").total_bytes == min(sizes)
    assert lr.from_safetensors(shards / "empty") is None


def _counts(backbone=1000, head=10, lora=5, trainable=15, largest=100):
    return st.Counts(backbone=backbone, head=head, lora=lora, linear_weights=800, linear_numels={"200": 4},
                     linear_biases=0, largest_linear=200, largest_layer=largest, persistent=0, trainable=trainable)


def _zero(param=None, optimizer=None, stage=3):
    return st.ZeroSettings(stage=stage, offload_param=param, offload_optimizer=optimizer, reduce_bucket=0,
                           prefetch_bucket=0, persistence_threshold=0, overlap_comm=False)


CK = lr.Checkpoint("test", shard_bytes=50_000, dtype_bytes=2, total_bytes=200_000)


@pytest.mark.parametrize("case,model", [
    (lr.LoadCase(True, None, 2), 4 * 10),                              # qlora: weights go to the GPU on arrival
    (lr.LoadCase(False, None, 2), 2 * (1015 - 15) + 4 * 15),           # lora: frozen bf16 + trainable fp32
    (lr.LoadCase(False, _zero(stage=2), 2), 2 * 1015),                 # ZeRO-2: the 16-bit model
    (lr.LoadCase(False, _zero(), 2), 0),                               # ZeRO-3: partitions on the GPU
    (lr.LoadCase(False, _zero("cpu", "cpu"), 2), 2 * 1015 + 12 * 15),  # partitions + master/moments of trainables
    (lr.LoadCase(False, _zero("nvme", "nvme"), 2), 0),                 # ZeRO-Infinity: both on NVMe
])
def test_streamed_load_keeps_one_shard_one_tensor_and_what_the_profile_places_on_the_cpu(case, model):
    parts = lr.streamed_peak(_counts(), CK, case)
    gathered = 2 * 100 if case.zero is not None and case.zero.stage == 3 else 0
    assert parts["model"] == model
    assert parts["shard"] == CK.shard_bytes and parts["tensor"] == 100 * 2 + gathered  # bf16 read, no cast
    assert parts["total"] == lr.PROCESS_BASELINE + CK.shard_bytes + parts["tensor"] + model


def test_a_cast_on_arrival_holds_both_copies_and_no_checkpoint_reads_nothing():
    fp32 = lr.Checkpoint("test", 50_000, 4, 200_000)
    assert lr.streamed_peak(_counts(), fp32, lr.LoadCase(False, None, 2))["tensor"] == 100 * (4 + 2)
    none = lr.streamed_peak(_counts(), None, lr.LoadCase(False, None, 2))
    assert none["shard"] == none["tensor"] == 0


def test_terratorch_backbones_load_whole_in_fp32_beside_the_checkpoint():
    parts = lr.whole_peak(_counts(), CK)
    assert parts["model"] == 4 * 1015 and parts["shard"] == CK.total_bytes


def test_the_planner_reads_the_experiments_checkpoint_else_the_catalog(shards):
    from trainer.backbones import catalog
    from trainer.config import build_experiment
    from trainer.plan import planner
    entry = catalog.get("internvl2_40b")
    own = types.SimpleNamespace(entry=entry, family=entry.family)

    def measurer(loads):
        memo = {}
        return types.SimpleNamespace(loads=loads, own=own, once_per_plan=lambda k, f: memo.setdefault(k, f()))

    def exp(path):
        kwargs = {"mode": "full"} | ({"pretrained_path": str(path)} if path else {})
        return build_experiment({"model": {"backbone": "internvl2_40b", "backbone_kwargs": kwargs}}, source="t")

    here = planner.checkpoint_of(exp(shards), measurer(True))
    assert here.source.startswith("safetensors headers of 2 shard(s)") and here.dtype_bytes == 2
    published = planner.checkpoint_of(exp(None), measurer(True))
    assert published.source.startswith("catalog") and published.total_bytes == int(2 * entry.published_params)
    assert published.shard_bytes == lr.PUBLISHED_SHARD_BYTES
    assert planner.checkpoint_of(exp(None), measurer(False)) is None
