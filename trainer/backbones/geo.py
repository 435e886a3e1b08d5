"""Clay v1 / v1.5 and SatMAE ViT-L as registered encoders (TerraTorch ships them only as model factories).

Clay wraps TerraTorch's own encoder modules (clay_v1 EmbeddingEncoder, clay_v15 Encoder): its
wavelength-conditioned DynamicEmbedding generates patch-embedding weights per band, so any band set
works natively — give `bands` (names TerraTorch's Clay WAVELENGTHS knows) or `waves` (µm). SatMAE's
encoder is timm's VisionTransformer (SatMAE's models_vit subclasses it, so checkpoints share timm
keys); multispectral tiles go through the same input adapter as the VLMs. Both return one feature
per `out_indices` entry, CLS dropped, as maps [B, D, h, w] (or tokens), and checkpoint their own
blocks with `torch.utils.checkpoint(..., use_reentrant=False)` when asked.
"""
from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.backbones.adapters import (InputAdapter, expand_conv_input, grid_to_output, resolve_out_indices,
                                       resolve_rgb_indices)
from trainer.errors import ConfigError

CLAY_DEFAULT_BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]  # HLS order, as TerraTorch's Embedder


def clay_encoder(dims: dict) -> nn.Module:
    """TerraTorch's Clay encoder for `dims` (imports TerraTorch, lazily)."""
    kw = dict(patch_size=dims["patch_size"], dim=dims["dim"], depth=dims["depth"], heads=dims["heads"],
              dim_head=dims["dim_head"], mlp_ratio=dims["mlp_ratio"])
    if dims["version"] == "v1":
        from terratorch.models.backbones.clay_v1.modules import EmbeddingEncoder
        # img_size only sizes EmbeddingEncoder's own fixed-grid encodings, which we do not use
        return EmbeddingEncoder(img_size=256, **kw)
    from terratorch.models.backbones.clay_v15.model import Encoder
    return Encoder(mask_ratio=0.0, shuffle=False, **kw)


class _OwnBlocks(nn.Module):
    patch_size = None  # the backbone sizes the tile itself (see vlm.HFStackBackbone)
    _checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        self._checkpointing = True

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        # recompute each block in backward instead of storing its activations
        if self._checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def _outputs(self, outs: list[torch.Tensor], gh: int, gw: int) -> list[torch.Tensor]:
        b, d = outs[0].shape[0], outs[0].shape[-1]
        return [grid_to_output(outs[i][:, 1:].reshape(b, gh, gw, d), self.output_format) for i in self.out_indices]


def _clay_block(attn: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = attn(x) + x  # Clay's pre-norm residual block (norms live inside Attention / FeedForward)
    return ff(x) + x


class ClayBackbone(_OwnBlocks):
    lora_target_modules = ["to_qkv", "to_out", "net.1", "net.3"]

    def __init__(self, dims: dict, out_indices: list[int] | None = None, bands: list[str] | None = None,
                 waves: list[float] | None = None, gsd: float = 10.0, output_format: str = "maps"):
        super().__init__()
        from terratorch.models.backbones.clay_v1.modules import WAVELENGTHS

        if waves is None:
            bands = list(bands or CLAY_DEFAULT_BANDS)
            unknown = [b for b in bands if b not in WAVELENGTHS]
            if unknown:
                raise ConfigError(f"model.backbone_kwargs.bands: Clay has no wavelength for {unknown}; "
                                  f"use names from {sorted(WAVELENGTHS)} or give backbone_kwargs.waves (µm)")
            waves = [WAVELENGTHS[b] for b in bands]
        self.register_buffer("waves", torch.tensor(waves, dtype=torch.float32), persistent=False)
        self.in_channels, self.gsd, self.output_format = len(waves), gsd, output_format
        self.tile_patch = dims["patch_size"]
        self.encoder = clay_encoder(dims)
        self.out_indices = resolve_out_indices(out_indices, dims["depth"])
        self.out_channels = [dims["dim"]] * len(self.out_indices)

    def truncate(self) -> None:  # idempotent
        del self.encoder.transformer.layers[max(self.out_indices) + 1:]

    def finalize(self) -> None:
        self.truncate()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        from terratorch.models.backbones.clay_v1.utils import posemb_sincos_2d_with_gsd

        if x.shape[1] != self.in_channels:
            raise ConfigError(f"model.backbone_kwargs.bands: built for {self.in_channels} bands, "
                              f"the batch has {x.shape[1]}")
        enc, p = self.encoder, self.tile_patch
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        x = x[..., : gh * p, : gw * p]
        patches, _ = enc.patch_embedding(x, self.waves)  # [B, L, D], weights generated from wavelengths
        b, _, d = patches.shape
        # Clay's encodings: sin-cos position scaled by GSD in D-8 channels, time/lat-lon (zeros: unknown) in 8
        pos = posemb_sincos_2d_with_gsd(h=gh, w=gw, dim=d - 8, gsd=self.gsd).to(patches)
        patches = patches + torch.cat([pos.expand(b, -1, -1), patches.new_zeros(b, gh * gw, 8)], dim=-1)
        hidden = torch.cat([enc.cls_token.expand(b, -1, -1), patches], dim=1)
        outs = []
        for attn, ff in enc.transformer.layers:
            hidden = self._run(partial(_clay_block, attn, ff), hidden)
            outs.append(hidden)
        outs[-1] = enc.transformer.norm(outs[-1])
        return self._outputs(outs, gh, gw)


class SatMAEBackbone(_OwnBlocks):
    lora_target_modules = ["qkv", "attn.proj", "fc1", "fc2"]

    def __init__(self, dims: dict, out_indices: list[int] | None = None, in_channels: int = 6,
                 bands: list[str] | None = None, adapter: str = "proj", rgb_indices: list[int] | None = None,
                 image_size: int | None = None, output_format: str = "maps"):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        # dynamic_img_size: timm interpolates the position embedding to each input's grid
        self.vit = VisionTransformer(img_size=dims["img_size"], patch_size=dims["patch_size"], in_chans=3,
                                     embed_dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
                                     mlp_ratio=dims["mlp_ratio"], num_classes=0, dynamic_img_size=True)
        self.output_format, self.tile_patch = output_format, dims["patch_size"]
        self.rgb_indices = resolve_rgb_indices(in_channels, bands, rgb_indices)
        self.input_adapter = InputAdapter(adapter, in_channels, self.rgb_indices, dims["patch_size"], image_size)
        self.out_indices = resolve_out_indices(out_indices, dims["depth"])
        self.out_channels = [dims["embed_dim"]] * len(self.out_indices)

    def truncate(self) -> None:  # idempotent
        del self.vit.blocks[max(self.out_indices) + 1:]

    def finalize(self) -> None:
        self.truncate()
        if self.input_adapter.mode == "expand":
            self.vit.patch_embed.proj = expand_conv_input(self.vit.patch_embed.proj, self.input_adapter.in_channels,
                                                          self.rgb_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        px = self.input_adapter(x)
        gh, gw = px.shape[-2] // self.tile_patch, px.shape[-1] // self.tile_patch
        vit = self.vit
        hidden = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(px))))
        outs = []
        for block in vit.blocks:
            hidden = self._run(block, hidden)
            outs.append(hidden)
        outs[-1] = vit.norm(outs[-1])
        return self._outputs(outs, gh, gw)


def map_geo_keys(state: dict, family: str) -> dict:
    """Clay Lightning checkpoints (`model.encoder.*`) and SatMAE/timm state dicts → our module names."""
    out = {}
    for k, v in state.items():
        if family == "clay":
            k = re.sub(r"^(model\.)?encoder\.", "encoder.", k)
        else:
            k = re.sub(r"^(model\.)?(vit\.)?", "vit.", k, count=1)
        out[k] = v
    return out


GEO_UNUSED = (r"^model\.(decoder|teacher|proj)", r"^(model\.)?decoder", r"^vit\.(head|fc_norm|decoder|mask_token)",
              r"^vit\.decoder_")
