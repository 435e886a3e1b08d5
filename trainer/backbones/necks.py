"""terrascale's necks, registered into TerraTorch's neck registry by `trainer.backbones.register_all()`.

`ProjectChannels` puts a learned 1x1 projection between a very wide backbone and the decoder. A large VLM's
language-model layers are 5120-8192 channels wide; TerraTorch's `LearnedInterpolateToPyramidal` sizes its
transposed convolutions from the input width, so straight on InternVL2-40B's 7168 channels it alone holds
231M trainable parameters (fp32 weights + Adam states ~ 3.7 GB). Projecting each feature map to
`out_channels` first makes the neck and decoder cost independent of the backbone width:

    SelectIndices -> ReshapeTokensToImage -> ProjectChannels -> LearnedInterpolateToPyramidal -> decoder

This module imports TerraTorch (11-17 s): only `register_all()` imports it, never the planner's fast path.
"""
from __future__ import annotations

import math

import torch
from terratorch.models.necks import Neck
from torch import nn

from trainer.errors import ConfigError

# GroupNorm groups when `norm` is on: statistics per sample, so it behaves the same at batch size 1 (the large-VLM
# configs' batch) as at 64, unlike BatchNorm.
_GROUPS = 32


class ProjectChannels(Neck):
    """A learned 1x1 convolution per feature map, from its width to `out_channels` (image features: B, C, H, W).

    norm: GroupNorm after each projection. The layers a VLM returns differ in scale by orders of magnitude
    (early vs. last language-model layers, outlier channels); normalising puts them on one scale for the decoder.
    Cost: 2 x out_channels parameters per map.
    """

    def __init__(self, channel_list: list[int], out_channels: int = 256, norm: bool = True) -> None:
        super().__init__(channel_list)
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 4 \
                or out_channels % 4:
            raise ConfigError([f"model.necks: ProjectChannels out_channels={out_channels!r} must be a positive "
                               "multiple of 4 (LearnedInterpolateToPyramidal after it divides the first map's "
                               "channels by 4), e.g. out_channels: 256"])
        if not channel_list:
            raise ConfigError(["model.necks: ProjectChannels received no feature maps; put it after SelectIndices "
                               "and ReshapeTokensToImage"])
        self.out_channels = out_channels
        groups = math.gcd(_GROUPS, out_channels)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=1, bias=not norm),
                          *([nn.GroupNorm(groups, out_channels)] if norm else []))
            for c in channel_list)

    def forward(self, features: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
        if len(features) != len(self.projections):
            raise ValueError(f"ProjectChannels was built for {len(self.projections)} feature maps, got "
                             f"{len(features)}")
        out = []
        for x, proj in zip(features, self.projections, strict=True):
            if x.dim() != 4:
                raise ValueError(f"ProjectChannels expects image features (B, C, H, W), got shape {tuple(x.shape)}: "
                                 "put ReshapeTokensToImage before it")
            out.append(proj(x))
        return out

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return [self.out_channels] * len(channel_list)


NECKS = (ProjectChannels,)


def register_necks() -> list[str]:
    """Add terrascale's necks to TerraTorch's neck registry (found by name, e.g. `{name: ProjectChannels}`)."""
    from terratorch.registry import TERRATORCH_NECK_REGISTRY

    for neck in NECKS:
        if neck.__name__ not in TERRATORCH_NECK_REGISTRY:
            TERRATORCH_NECK_REGISTRY.register(neck)
    return [n.__name__ for n in NECKS]
