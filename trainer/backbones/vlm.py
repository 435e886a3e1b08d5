"""Vision-language models as TerraTorch backbones (InternVL, Qwen2-VL, Gemma 3; EarthMind is InternVL).

mode="vision": the vision tower alone; features are its layers `out_indices`.
mode="full": vision tower → projector → the language model's decoder layers run over the image
tokens (as `inputs_embeds`); features are LM layers `out_indices`. The LM head and the token
embedding table are never built (feature extraction has no text); the saving is logged.
Either way `forward(x)` returns one tensor per `out_indices` entry, maps [B, D, h, w] by default
(`output_format: tokens` gives [B, h*w, D] without a CLS token), so TerraTorch's
SelectIndices → ReshapeTokensToImage → LearnedInterpolateToPyramidal necks and UNet/UperNet decoders
work unchanged: ReshapeTokensToImage passes 4-D maps through, which also makes non-square tiles
safe. Layers deeper than the deepest requested one are dropped; the deepest feature goes through the
stack's final norm, as the model's own last hidden state does.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import catalog
from trainer.backbones.adapters import (InputAdapter, default_out_indices, expand_conv_input,  # noqa: F401
                                       grid_to_output, resolve_out_indices, resolve_rgb_indices)
from trainer.errors import ConfigError

log = logging.getLogger(__name__)
_LLM_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HFStackBackbone(nn.Module):
    """What our HF-backed backbones share: out_channels, output format, grad checkpointing, truncation."""

    # TerraTorch's PixelWiseModel pads the input to a multiple of the first `patch_size` it finds in
    # backbone.modules(); None here means "don't": the input adapter sizes the tile itself.
    patch_size = None
    lora_target_modules: list[str] = []
    # peft (via transformers' weight-conversion mapping) reads the root's base_model_prefix when a
    # sub-model has conversions (Gemma 3, Granite MoE); we are not a PreTrainedModel, so: no prefix.
    base_model_prefix = ""

    def gradient_checkpointing_enable(self) -> None:
        """HF's own switch on every transformers sub-model, non-reentrant (works under ZeRO-3 and LoRA)."""
        from transformers import PreTrainedModel

        for module in self.children():
            if isinstance(module, PreTrainedModel):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @staticmethod
    def _truncate(layers: nn.ModuleList, keep: int, config=None, what: str = "") -> int:
        """Drop layers past `keep` (features never read them); returns the parameters saved."""
        dropped = layers[keep:]
        saved = sum(p.numel() for p in dropped.parameters())
        del layers[keep:]
        if config is not None:
            config.num_hidden_layers = keep
        if saved:
            log.info("%s: dropped %d layers after the deepest out_index (%.1fM parameters)", what, len(dropped),
                     saved / 1e6)
        return saved


class VLMBackbone(HFStackBackbone):
    family = ""

    def __init__(self, config, mode: str = "vision", out_indices: list[int] | None = None, in_channels: int = 6,
                 bands: list[str] | None = None, adapter: str = "proj", rgb_indices: list[int] | None = None,
                 image_size: int | None = None, output_format: str = "maps"):
        super().__init__()
        if mode not in (catalog.VISION, catalog.FULL):
            raise ConfigError(f"model.backbone_kwargs.mode: {mode!r} is not one of ['vision', 'full']")
        if output_format not in ("maps", "tokens"):
            raise ConfigError(f"model.backbone_kwargs.output_format: {output_format!r} is not 'maps' or 'tokens'")
        self.config, self.mode, self.output_format = config, mode, output_format
        self._prepare_config(config)
        for key, part in catalog.build_parts(config, self.family, mode).items():
            self.add_module(key, part)
        self.out_indices = resolve_out_indices(out_indices, len(self._feature_layers()))
        self.rgb_indices = resolve_rgb_indices(in_channels, bands, rgb_indices)
        self.input_adapter = InputAdapter(adapter, in_channels, self.rgb_indices, self._stride(), image_size)
        width = config.text_config.hidden_size if mode == catalog.FULL else self._vision_width()
        self.out_channels = [width] * len(self.out_indices)

    # --- family hooks ---
    def _prepare_config(self, config) -> None: ...
    def _vision_width(self) -> int: raise NotImplementedError
    def vision_layers(self) -> nn.ModuleList: raise NotImplementedError
    def _patch(self) -> int: raise NotImplementedError
    def _stride(self) -> int: raise NotImplementedError
    def _patch_conv(self) -> tuple[nn.Module, str]: raise NotImplementedError
    def _vision_stack(self, px: torch.Tensor, all_layers: bool) -> list[torch.Tensor]: raise NotImplementedError
    def _project(self, last: torch.Tensor, shape: torch.Size) -> torch.Tensor: raise NotImplementedError
    def _lm_positions(self, batch: int, h: int, w: int, device) -> torch.Tensor | None: return None

    def _feature_layers(self) -> nn.ModuleList:
        return self.language_model.layers if self.mode == catalog.FULL else self.vision_layers()

    def truncate(self) -> None:
        """Drop the layers no feature reads and log the savings. Before loading, so they are never read;
        idempotent."""
        if getattr(self, "_truncated", False):
            return
        self._truncated = True
        keep = max(self.out_indices) + 1
        if self.mode == catalog.FULL:
            text = self.config.text_config
            head = 0 if self.config.tie_word_embeddings else text.vocab_size * text.hidden_size
            saved = text.vocab_size * text.hidden_size + head
            saved += self._truncate(self.language_model.layers, keep, text, "language model")
            log.info("full mode: LM head and text embeddings not built: %d parameters (%.1fM) saved in total",
                     saved, saved / 1e6)
        else:
            self._truncate(self.vision_layers(), keep, None, "vision tower")

    def finalize(self) -> None:
        """Once, after loading: truncate (if not done yet) and expand the patch embedding if asked."""
        self.truncate()
        if self.input_adapter.mode == "expand":
            owner, attr = self._patch_conv()
            setattr(owner, attr, expand_conv_input(getattr(owner, attr), self.input_adapter.in_channels,
                                                   self.rgb_indices))
            for name in ("num_channels", "in_channels"):  # the towers check/view by these
                if hasattr(owner, name):
                    setattr(owner, name, self.input_adapter.in_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        px = self.input_adapter(x)
        if self.mode == catalog.VISION:
            stack = self._vision_stack(px, all_layers=True)
        else:
            grid = self._project(self._vision_stack(px, all_layers=False)[-1], px.shape)
            stack = self._lm_stack(grid)
        return [grid_to_output(stack[i], self.output_format) for i in self.out_indices]

    def _lm_stack(self, grid: torch.Tensor) -> list[torch.Tensor]:
        b, h, w, d = grid.shape
        out = self.language_model(inputs_embeds=grid.reshape(b, h * w, d), output_hidden_states=True,
                                  use_cache=False, position_ids=self._lm_positions(b, h, w, grid.device))
        hidden = list(out.hidden_states[1:])  # [0] is the input embedding
        hidden[-1] = out.last_hidden_state
        return [t.reshape(b, h, w, -1) for t in hidden]


class InternVLBackbone(VLMBackbone):
    family = "internvl"
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2", *_LLM_LORA[3:]]

    def _vision_width(self): return self.config.vision_config.hidden_size
    def vision_layers(self): return self.vision_tower.encoder.layer
    def _patch(self): return self.config.vision_config.patch_size[0]
    def _patch_conv(self): return self.vision_tower.embeddings.patch_embeddings, "projection"

    def _stride(self):
        # full mode pixel-shuffles 2×2 token blocks (downsample_ratio 0.5), so the grid must be even
        shuffle = round(1 / self.config.downsample_ratio) if self.mode == catalog.FULL else 1
        return self._patch() * shuffle

    def _vision_stack(self, px, all_layers):
        out = self.vision_tower(pixel_values=px, output_hidden_states=all_layers)
        hidden = list(out.hidden_states[1:]) if all_layers else [None]
        hidden[-1] = out.last_hidden_state
        gh, gw = px.shape[-2] // self._patch(), px.shape[-1] // self._patch()
        return [t[:, 1:].reshape(px.shape[0], gh, gw, -1) for t in hidden]  # drop CLS

    def _project(self, grid, shape):
        # InternVL's pixel shuffle: each 2×2 block of tokens becomes one token with 4× the channels
        b, h, w, c = grid.shape
        s = round(1 / self.config.downsample_ratio)
        # channel order (row offset, column offset, channel), as InternVL's pixel_shuffle (ps_version v2)
        x = grid.reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // s, w // s, s * s * c)
        return self.multi_modal_projector(x)


class Qwen2VLBackbone(VLMBackbone):
    family = "qwen2_vl"
    lora_target_modules = ["attn.qkv", "attn.proj", "fc1", "fc2", *_LLM_LORA]

    def _vision_width(self): return self.config.vision_config.embed_dim
    def vision_layers(self): return self.visual.blocks
    def _patch(self): return self.config.vision_config.patch_size
    def _stride(self): return self._patch() * self.config.vision_config.spatial_merge_size
    def _patch_conv(self): return self.visual.patch_embed, "proj"

    def _patchify(self, px: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B*gh*gw, C*T*p*p] in Qwen2-VL's processor layout: a still image repeated over
        the temporal patch, tokens merge-block-major (m×m neighbours adjacent), each flattened (C, T, p, p)."""
        vc = self.config.vision_config
        p, m, t = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        b, c, hh, ww = px.shape
        gh, gw = hh // p, ww // p
        x = px.unsqueeze(2).expand(b, c, t, hh, ww).reshape(b, c, t, gh // m, m, p, gw // m, m, p)
        return x.permute(0, 3, 6, 4, 7, 1, 2, 5, 8).reshape(b * gh * gw, c * t * p * p)

    def _to_raster(self, tokens: torch.Tensor, b: int, gh: int, gw: int) -> torch.Tensor:
        """Merge-block-major tokens → [B, gh, gw, D] in raster order."""
        m, d = self.config.vision_config.spatial_merge_size, tokens.shape[-1]
        return tokens.reshape(b, gh // m, gw // m, m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(b, gh, gw, d)

    def _vision_stack(self, px, all_layers):
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        vc = self.config.vision_config
        gh, gw = px.shape[-2] // vc.patch_size, px.shape[-1] // vc.patch_size
        grid_thw = torch.tensor([[1, gh, gw]] * px.shape[0], device=px.device)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, vc)
        hidden = self.visual.patch_embed(self._patchify(px))
        rope = self.visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, vc.spatial_merge_size))
        outs = []
        for block in self.visual.blocks:
            hidden = block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rope)
            outs.append(hidden)
        if not all_layers:
            return [outs[-1]]  # stays in merge-block order: the merger consumes m×m groups
        return [self._to_raster(o, px.shape[0], gh, gw) for o in outs]

    def _project(self, tokens, shape):
        m = self.config.vision_config.spatial_merge_size
        gh, gw = shape[-2] // self._patch(), shape[-1] // self._patch()
        merged = self.visual.merger(tokens)  # one token per m×m block, blocks in raster order
        return merged.reshape(shape[0], gh // m, gw // m, -1)

    def _lm_positions(self, batch, h, w, device):
        # M-RoPE for an image: temporal index 0, then row and column, as Qwen2-VL's get_rope_index does
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        pos = torch.stack([torch.zeros_like(rows), rows, cols])
        return pos[:, None, :].expand(3, batch, h * w)


class Gemma3Backbone(VLMBackbone):
    family = "gemma3"
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", *_LLM_LORA[3:]]

    def _prepare_config(self, config):
        # Gemma 3 attends bidirectionally inside an image block; a sequence of image tokens alone is one
        # such block, which is exactly what the text model's bidirectional switch gives.
        config.text_config.use_bidirectional_attention = True

    def _vision_width(self): return self.config.vision_config.hidden_size
    def vision_layers(self): return self.vision_tower.encoder.layers
    def _patch(self): return self.config.vision_config.patch_size
    def _patch_conv(self): return self.vision_tower.embeddings, "patch_embedding"

    def _pool(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) // round(self.config.mm_tokens_per_image ** 0.5)

    def _stride(self):
        return self._patch() * (self._pool() if self.mode == catalog.FULL else 1)

    def _vision_stack(self, px, all_layers):
        out = self.vision_tower(pixel_values=px, output_hidden_states=all_layers, interpolate_pos_encoding=True)
        hidden = list(out.hidden_states[1:]) if all_layers else [None]
        hidden[-1] = out.last_hidden_state  # after SigLIP's post_layernorm, as Gemma 3 feeds its projector
        gh, gw = px.shape[-2] // self._patch(), px.shape[-1] // self._patch()
        return [t.reshape(px.shape[0], gh, gw, -1) for t in hidden]

    def _project(self, grid, shape):
        # Gemma3MultiModalProjector hard-codes the 896-px grid; the same ops at the tile's grid size
        proj = self.multi_modal_projector
        pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), self._pool()).permute(0, 2, 3, 1)
        return torch.matmul(proj.mm_soft_emb_norm(pooled), proj.mm_input_projection_weight).type_as(grid)


FAMILIES = {"internvl": InternVLBackbone, "qwen2_vl": Qwen2VLBackbone, "gemma3": Gemma3Backbone}
