"""Sizes as users write them: '24GiB', '64 GB', '128G' or a byte count."""
from __future__ import annotations

import re

from trainer.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1 << 30,
          "gb": 1e9, "gib": 1 << 30, "t": 1 << 40, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """'24GiB', '24 GB', '64G' (G = GiB, as nvidia-smi and free -g count) or a byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError([f"{what}: {text!r} is not a size; write e.g. 24GiB, 64GB or 128G"])
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])

