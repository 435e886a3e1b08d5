"""A text-only LLM as a token encoder for tiles (Granite 4.0 Tiny, hybrid Mamba2/attention with MoE).

EXPERIMENTAL. The LLM was never trained on images: a learned patch embedding (Conv2d, kernel = stride
= `patch_size`) plus a learned 2-D position embedding turns the tile into tokens fed as
`inputs_embeds`, the LLM's decoder layers encode them in raster order, and features from
`out_indices` come out as a grid. Granite's attention layers use no positional encoding and its
Mamba layers scan causally, so the position embedding is what tells tokens where they are. Whether
pretrained language weights help geospatial features is an open question this backbone lets you test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import catalog
from trainer.backbones.vlm import HFStackBackbone, grid_to_output, resolve_out_indices
from trainer.errors import ConfigError


class LLMTokenEncoder(HFStackBackbone):
    family = "granite_hybrid"
    # attention projections, Mamba in/out projections and the shared expert; routed experts are fused
    # 3-D parameters, not nn.Linear, so peft cannot wrap them.
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj",
                           "input_linear", "output_linear"]

    def __init__(self, config, out_indices: list[int] | None = None, in_channels: int = 6, patch_size: int = 16,
                 pos_grid: int = 14, output_format: str = "maps"):
        super().__init__()
        if output_format not in ("maps", "tokens"):
            raise ConfigError(f"model.backbone_kwargs.output_format: {output_format!r} is not 'maps' or 'tokens'")
        self.config, self.output_format, self.in_channels = config, output_format, in_channels
        self.language_model = catalog.build_parts(config, self.family, catalog.ENCODER)["language_model"]
        self.out_indices = resolve_out_indices(out_indices, len(self.language_model.layers))
        d = config.hidden_size
        self.tile_patch = patch_size
        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=patch_size, stride=patch_size)
        # learned at a 14×14 grid (224-px tiles at patch 16) and interpolated to the actual grid
        self.pos_embed = nn.Parameter(torch.zeros(1, d, pos_grid, pos_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.out_channels = [d] * len(self.out_indices)

    def truncate(self) -> None:  # idempotent: slicing past the end drops nothing
        self._truncate(self.language_model.layers, max(self.out_indices) + 1, self.config, "language model")
        self.config.layer_types = self.config.layer_types[: self.config.num_hidden_layers]

    def finalize(self) -> None:
        self.truncate()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"model.backbone_kwargs.in_channels: built for {self.in_channels} bands, "
                              f"the batch has {x.shape[1]}")
        p = self.tile_patch
        h, w = x.shape[-2:]
        if h % p or w % p:  # snap to the patch grid rather than silently dropping border pixels
            x = F.interpolate(x, size=(max(p, round(h / p) * p), max(p, round(w / p) * p)), mode="bilinear")
        tokens = self.patch_embed(x)
        pos = F.interpolate(self.pos_embed, size=tokens.shape[-2:], mode="bicubic", align_corners=False)
        grid = (tokens + pos).permute(0, 2, 3, 1)
        b, gh, gw, d = grid.shape
        out = self.language_model(inputs_embeds=grid.reshape(b, gh * gw, d), output_hidden_states=True,
                                  use_cache=False)
        hidden = list(out.hidden_states[1:])
        hidden[-1] = out.last_hidden_state
        return [grid_to_output(hidden[i].reshape(b, gh, gw, d), self.output_format) for i in self.out_indices]
