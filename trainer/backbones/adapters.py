"""Input adapters: multispectral / SAR tiles (2–13 bands, any size) into what an RGB tower expects.

VLM towers were pretrained on 3-channel RGB at fixed sizes (448 InternViT, 896 SigLIP, multiples of
28 for Qwen2-VL). Three ways across the gap, chosen with the backbone kwarg `adapter`:

- `rgb`: pick three bands (`rgb_indices`, or found by name in `bands`); the other bands are unused.
- `proj`: a learned 1×1 conv to 3 channels, initialised to the `rgb` selection so step 0 equals the
  pretrained behaviour and training learns how much SWIR/NIR/SAR to mix in.
- `expand`: widen the tower's own patch-embedding conv to all bands; RGB kernels stay pretrained and
  each extra band starts from the mean RGB kernel (the usual "mean of RGB" init), everything scaled by
  3/bands so a band-uniform input keeps the activation scale the tower was trained on.

Tiles are resized only when needed: to `image_size` if given, else to the nearest multiple of the
tower's token stride; position embeddings are interpolated to the resulting grid by each family.
EarthMind's SAR + optical input (Sentinel-1 VV/VH next to Sentinel-2 bands) is one tile whose bands
are named in `bands`; `proj` or `expand` then give SAR its own weights.

The output side is shared here too: which layers a backbone returns (`resolve_out_indices`) and as maps or tokens
(`grid_to_output`), for the VLM (vlm.py) and geospatial (geo.py) towers alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError

ADAPTERS = ("rgb", "proj", "expand")

# Names a band list may use for red/green/blue: HLS (TerraTorch's HLSBands), Sentinel-2 and plain names.
_RGB_NAMES = (("RED", "B04", "B4", "R"), ("GREEN", "B03", "B3", "G"), ("BLUE", "B02", "B2", "B"))
# TerraTorch's default HLS order is BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2: RGB = 2, 1, 0.
_DEFAULT_RGB = (2, 1, 0)


def resolve_rgb_indices(in_channels: int, bands: list[str] | None, rgb_indices: list[int] | None) -> tuple[int, ...]:
    """Which input bands feed the tower's R, G and B kernels (in that order)."""
    if rgb_indices is not None:
        idx = tuple(int(i) for i in rgb_indices)
    elif bands is not None:
        upper = [str(b).upper() for b in bands]
        idx = []
        for aliases in _RGB_NAMES:
            hit = [upper.index(a) for a in aliases if a in upper]
            if not hit:
                raise ConfigError(f"model.backbone_kwargs.bands: no {aliases[0]} band in {bands}; "
                                  "set backbone_kwargs.rgb_indices to the three bands that stand in for R, G, B")
            idx.append(hit[0])
        idx = tuple(idx)
    else:
        idx = _DEFAULT_RGB
    if len(idx) != 3 or any(not 0 <= i < in_channels for i in idx):
        raise ConfigError(f"model.backbone_kwargs.rgb_indices: need 3 indices in [0, {in_channels}), got {list(idx)}")
    return idx


class InputAdapter(nn.Module):
    """[B, bands, H, W] → [B, C, H', W'] with C = 3 (rgb, proj) or bands (expand), H', W' multiples of `stride`."""

    def __init__(self, mode: str, in_channels: int, rgb_indices: tuple[int, ...], stride: int,
                 image_size: int | None = None):
        super().__init__()
        if mode not in ADAPTERS:
            raise ConfigError(f"model.backbone_kwargs.adapter: {mode!r} is not one of {list(ADAPTERS)}")
        if mode == "rgb" and in_channels < 3:
            raise ConfigError(f"model.backbone_kwargs.adapter: 'rgb' needs ≥ 3 bands, the tile has {in_channels}; "
                              "use 'proj' or 'expand' (e.g. for SAR VV/VH)")
        if image_size is not None and image_size % stride:
            raise ConfigError(f"model.backbone_kwargs.image_size: {image_size} is not a multiple of the "
                              f"token stride {stride}; use {max(stride, round(image_size / stride) * stride)}")
        self.mode, self.in_channels, self.stride, self.image_size = mode, in_channels, stride, image_size
        self.register_buffer("rgb_index", torch.tensor(rgb_indices, dtype=torch.long), persistent=False)
        self.proj = None
        if mode == "proj":
            self.proj = nn.Conv2d(in_channels, 3, kernel_size=1)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.bias.zero_()
                for out_c, band in enumerate(rgb_indices):
                    self.proj.weight[out_c, band] = 1.0

    @property
    def out_channels(self) -> int:
        return self.in_channels if self.mode == "expand" else 3

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size, self.image_size
        snap = lambda n: max(self.stride, round(n / self.stride) * self.stride)  # noqa: E731
        return snap(height), snap(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"model.backbone_kwargs.in_channels: the backbone was built for {self.in_channels} "
                              f"bands but the batch has {x.shape[1]}")
        if self.mode == "rgb":
            x = x.index_select(1, self.rgb_index)
        elif self.mode == "proj":
            x = self.proj(x)
        size = self.target_size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


@torch.no_grad()
def expand_conv_input(conv: nn.Conv2d | nn.Conv3d, in_channels: int, rgb_indices: tuple[int, ...]) -> nn.Module:
    """A copy of an RGB patch-embedding conv taking `in_channels` bands (see module docstring)."""
    weight = conv.weight  # [D, 3, (T,) P, P]
    if weight.shape[1] != 3:
        raise ConfigError(f"model.backbone_kwargs.adapter: 'expand' needs a 3-channel patch embedding, "
                          f"found {weight.shape[1]} channels")
    new_shape = (weight.shape[0], in_channels, *weight.shape[2:])
    mean_rgb = weight.mean(dim=1, keepdim=True)
    new_weight = mean_rgb.expand(new_shape).clone()
    for rgb_c, band in enumerate(rgb_indices):
        new_weight[:, band] = weight[:, rgb_c]
    new_weight *= 3.0 / in_channels
    cls = type(conv)
    new = cls(in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
              padding=conv.padding, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(new_weight)
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


# which layers a backbone returns, and in which layout: shared by the VLM and geospatial backbones
def default_out_indices(num_layers: int, count: int = 4) -> list[int]:
    """`count` evenly spaced layers ending at the last: four scales for LearnedInterpolateToPyramidal."""
    return [max(0, round((i + 1) * num_layers / count) - 1) for i in range(count)]


def resolve_out_indices(out_indices: list[int] | None, num_layers: int) -> list[int]:
    if out_indices is None:
        return default_out_indices(num_layers)
    resolved = [i + num_layers if i < 0 else i for i in out_indices]
    bad = [i for i, r in zip(out_indices, resolved) if not 0 <= r < num_layers]
    if bad or not resolved:
        raise ConfigError(f"model.backbone_kwargs.out_indices: {list(out_indices)} must be non-empty and within "
                          f"the {num_layers} layers features are taken from")
    return resolved


def grid_to_output(grid: torch.Tensor, output_format: str) -> torch.Tensor:
    """[B, h, w, D] → maps [B, D, h, w] or tokens [B, h*w, D]."""
    if output_format == "tokens":
        return grid.flatten(1, 2)
    return grid.permute(0, 3, 1, 2).contiguous()
