"""A fingerprint of a backbone checkpoint: which base a small (adapters-only) export expects.

Method (`headers+sizes+samples`, sha256 over, per weight file in name order): the file name, its size, its
safetensors header (every tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB samples of its
data; plus config.json when there is one. Why not the full content: hashing a 40B bf16 checkpoint (80 GB) reads
all of it, ~30-60 s at NVMe speed and minutes from a network disk, on every prediction. The headers and sizes
catch another architecture, depth, dtype, layout or a truncated file; the samples catch the same architecture
with other values (another fine-tune, re-generated weights), since every weight of a different checkpoint
differs. It costs 1 MiB of reads per shard (milliseconds). What it cannot see: a change confined to bytes no
sample touches (a single edited tensor of a 5 GB shard); `content=True` hashes every byte instead.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

METHOD = "headers+sizes+samples"
FULL_METHOD = "full-content"
SAMPLES, SAMPLE_BYTES = 16, 64 << 10


def _header_len(f) -> int:
    raw = f.read(8)
    if len(raw) < 8:
        return 0
    (n,) = struct.unpack("<Q", raw)
    return n


def _file_digest(h, path: Path, content: bool) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            n = _header_len(f)
            if 0 < n <= size - 8:
                h.update(f.read(n))
                start = 8 + n
        f.seek(start)
        if content:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
            return
        data = size - start
        for i in range(SAMPLES):
            f.seek(start + (data - SAMPLE_BYTES) * i // max(1, SAMPLES - 1) if data > SAMPLE_BYTES else start)
            h.update(f.read(SAMPLE_BYTES))


def fingerprint(root: Path, files: list[Path], content: bool = False) -> dict:
    """{method, sha256, files, bytes} of the weight `files` of checkpoint `root` (a dir or one file)."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        _file_digest(h, path, content)
    config = (root if root.is_dir() else root.parent) / "config.json"
    if config.is_file():
        h.update(b"config.json\0" + config.read_bytes())
    return {"method": FULL_METHOD if content else METHOD, "sha256": h.hexdigest(),
            "files": sorted(p.name for p in files), "bytes": sum(p.stat().st_size for p in files)}


def checkpoint_fingerprint(pretrained_path: str, allow_pickle: bool = False, content: bool = False) -> dict:
    from trainer.backbones.loading import resolve_path, weight_files

    root = resolve_path(pretrained_path)
    return fingerprint(root, weight_files(root, allow_pickle), content)
