"""The base-checkpoint fingerprint a small export records: stable for the same files, different for another base."""
from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from trainer.train.basehash import FULL_METHOD, METHOD, fingerprint


def _ckpt(path, seed: int = 0, shape=(64, 4096)):
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({"a.weight": torch.randn(shape, generator=g), "b.bias": torch.randn(shape[0], generator=g)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "x"}')
    return path


def _fp(path, content=False):
    return fingerprint(path, sorted(path.glob("*.safetensors")), content)


def test_same_files_same_fingerprint_other_values_or_shapes_differ(tmp_path):
    a = _ckpt(tmp_path / "a")
    shutil.copytree(a, tmp_path / "copy")
    fp = _fp(a)
    assert fp["method"] == METHOD and fp["files"] == ["model.safetensors"] and fp["bytes"] > 1 << 20
    assert _fp(tmp_path / "copy")["sha256"] == fp["sha256"]
    assert _fp(_ckpt(tmp_path / "seed1", seed=1))["sha256"] != fp["sha256"]  # same header, other values
    assert _fp(_ckpt(tmp_path / "wide", shape=(64, 4104)))["sha256"] != fp["sha256"]
    (tmp_path / "copy" / "config.json").write_text('{"model_type": "y"}')
    assert _fp(tmp_path / "copy")["sha256"] != fp["sha256"]


def test_full_content_sees_a_byte_the_samples_miss(tmp_path):
    a = _ckpt(tmp_path / "a", shape=(256, 4096))  # 4 MB: the samples read 1 MiB of it
    b = tmp_path / "b"
    shutil.copytree(a, b)
    f = b / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2 + 12345] ^= 0xFF  # between two 64 KiB samples
    f.write_bytes(bytes(raw))
    assert _fp(b)["sha256"] == _fp(a)["sha256"]  # the documented blind spot of the sampled method
    full_a, full_b = _fp(a, content=True), _fp(b, content=True)
    assert full_a["method"] == FULL_METHOD and full_a["sha256"] != full_b["sha256"]
