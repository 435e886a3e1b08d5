"""Change detection over T co-registered dates: a shared encoder per date, fused features, then
TerraTorch's necks → decoder → head. The model takes our datasets' layout [B, T, C, H, W] and returns
logits [B, num_classes, H, W].

`task.fusion` chooses how dates meet, `task.num_dates` how many the model takes (default 2):
- diff (default): TerraTorch's `TemporalWrapper` runs one backbone over every date (shared weights) and
  subtracts the features, f(t0) - f(t1). With T > 2 dates it subtracts the last date from the mean of the
  earlier ones (`subset_lengths=[T-1, 1]`). Channels stay those of one date, so a single-date necks/decoder
  config fits unchanged.
- concat: `TemporalWrapper` stacks per-date features (D*T channels); the decoder learns the comparison.
  Costs T x the decoder's first-layer weights; keeps the order of dates, which diff only keeps in its sign.
- native: Prithvi's own temporal input, one ViT over all frames (`num_frames=T`, space-time attention);
  `ReshapeTokensToImage` stacks the frames into channels (`effective_time_dim`, filled in here). Prithvi only.
  Attention cost grows with (T x tokens)^2 instead of T x tokens^2.

The wrappers pass the profile hooks through (LoRA targets, gradient checkpointing), so every memory profile
applies to the backbone inside them as it would to a single-date one. TerraTorch is imported only when a
model is built: `temporal_settings` is cheap (predict validates inputs with it before building anything).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.config import CHANGE_DETECTION, TaskConfig
from trainer.errors import ConfigError

FUSIONS = ("diff", "concat", "native")
# TerraTorch's own switches for its TemporalWrapper: here task.fusion decides, so they would conflict.
_TERRATORCH_TEMPORAL_KEYS = ("use_temporal", "temporal_pooling", "temporal_concat", "temporal_n_timestamps",
                             "temporal_features_permute_op", "temporal_subset_lengths")


@dataclass(frozen=True)
class TemporalSettings:
    fusion: str
    num_dates: int


def temporal_settings(task: TaskConfig) -> TemporalSettings:
    """`task.fusion` / `task.num_dates`, defaulting to diff / 2 (the config validates both)."""
    return TemporalSettings(task.date_fusion, task.dates)


class _ProfileHooks(nn.Module):
    """What `trainer.model.fitting` looks for on `model.encoder`, forwarded to the backbone inside."""

    backbone: nn.Module

    @property
    def lora_target_modules(self) -> list[str] | None:
        # Our VLM wrappers name their own targets; without them fitting falls back to the ViT defaults.
        return getattr(self.backbone, "lora_target_modules", None)

    def gradient_checkpointing_enable(self) -> None:
        from trainer.model.fitting import enable_grad_checkpointing

        enable_grad_checkpointing(self.backbone)

    def _check_dates(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.num_dates:
            raise ConfigError(f"task.num_dates: the model was built for {self.num_dates} dates [B, T, C, H, W] but "
                              f"got input of shape {tuple(x.shape)}; set task.num_dates to the number of dates")


class SharedEncoder(_ProfileHooks):
    """One backbone applied to every date, features fused by TerraTorch's TemporalWrapper (diff, concat)."""

    def __init__(self, backbone: nn.Module, fusion: str, num_dates: int):
        super().__init__()
        from terratorch.models.utils import TemporalWrapper

        subsets = [num_dates - 1, 1] if fusion == "diff" and num_dates > 2 else None
        self.num_dates = num_dates
        self.temporal = TemporalWrapper(backbone, pooling=fusion, n_timestamps=num_dates, subset_lengths=subsets)
        self.out_channels = list(self.temporal.out_channels)

    @property
    def backbone(self) -> nn.Module:
        return self.temporal.encoder

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_dates(x)
        return self.temporal(x.transpose(1, 2))  # TemporalWrapper takes [B, C, T, H, W]


class NativeTemporalEncoder(_ProfileHooks):
    """Prithvi over all T frames at once; only the axis order differs from what Prithvi takes."""

    def __init__(self, backbone: nn.Module, num_dates: int):
        super().__init__()
        self.num_dates = num_dates
        self.encoder = backbone
        self.out_channels = list(backbone.out_channels)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_dates(x)
        return self.encoder(x.transpose(1, 2))


def _native_necks(necks: list[dict[str, Any]] | None, time_dim: int) -> list[dict[str, Any]]:
    """Frames become channels in ReshapeTokensToImage; without that neck the decoder would get tokens."""
    necks = [dict(n) for n in necks or []]
    reshape = [n for n in necks if n.get("name") == "ReshapeTokensToImage"]
    if not reshape:
        raise ConfigError("model.necks: task.fusion=native needs a ReshapeTokensToImage neck (Prithvi returns tokens "
                          "of all frames), e.g. SelectIndices -> ReshapeTokensToImage -> LearnedInterpolateToPyramidal")
    for n in reshape:
        if n.setdefault("effective_time_dim", time_dim) != time_dim:
            raise ConfigError(f"model.necks: ReshapeTokensToImage.effective_time_dim={n['effective_time_dim']} but "
                              f"task.num_dates / tubelet_size = {time_dim}: remove the key, it is filled in")
    return necks


def temporal_backbone(name: str, fusion: str, num_dates: int, kwargs: dict[str, Any],
                      necks: list[dict[str, Any]] | None
                      ) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]] | None]:
    """The backbone `name` built from the `backbone_*` factory kwargs and wrapped per fusion.

    Returns (encoder module, the factory kwargs without backbone_* keys, necks): TerraTorch's
    EncoderDecoderFactory accepts a built backbone module and assembles necks, decoder and head around it.
    """
    from terratorch.registry import BACKBONE_REGISTRY

    if fusion not in FUSIONS:
        raise ConfigError([f"task.fusion: {fusion!r}; use one of {', '.join(FUSIONS)}"])
    backbone_kwargs = {k.removeprefix("backbone_"): v for k, v in kwargs.items() if k.startswith("backbone_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith("backbone_")}
    clash = [k for k in _TERRATORCH_TEMPORAL_KEYS if k in backbone_kwargs]
    if clash:
        raise ConfigError([f"model.backbone_kwargs.{k}: change detection fuses dates as task.fusion says "
                           f"({', '.join(FUSIONS)}); remove this TerraTorch switch" for k in clash])
    if fusion != "native":
        return SharedEncoder(BACKBONE_REGISTRY.build(name, **backbone_kwargs), fusion, num_dates), rest, necks
    # (that only Prithvi takes native fusion is the config's rule: Experiment._native_fusion_is_prithvis)
    frames = backbone_kwargs.get("num_frames", 1)
    if frames not in (1, num_dates):
        raise ConfigError(f"model.backbone_kwargs.num_frames={frames} but task.num_dates={num_dates}: with "
                          "task.fusion=native they are the same; remove num_frames (it is filled in)")
    tubelet = backbone_kwargs.get("tubelet_size", 1)
    if num_dates % tubelet:
        raise ConfigError(f"model.backbone_kwargs.tubelet_size={tubelet} does not divide task.num_dates={num_dates}")
    backbone_kwargs["num_frames"] = num_dates
    backbone = BACKBONE_REGISTRY.build(name, **backbone_kwargs)
    return NativeTemporalEncoder(backbone, num_dates), rest, _native_necks(necks, num_dates // tubelet)


def register_factory() -> None:
    """`TemporalEncoderDecoderFactory` in TerraTorch's model-factory registry (idempotent): a TerraTorch task (the
    native change-detection task, or a `terratorch fit` file) names it with `model_args.fusion` / `num_dates`."""
    from terratorch.models import EncoderDecoderFactory
    from terratorch.registry import MODEL_FACTORY_REGISTRY

    if "TemporalEncoderDecoderFactory" in MODEL_FACTORY_REGISTRY:
        return

    class TemporalEncoderDecoderFactory:
        """EncoderDecoderFactory over T dates: one backbone shared by every date, features fused (trainer.model.temporal).
        Takes the data layout [B, T, C, H, W]; `fusion` diff | concat | native, `num_dates` T."""

        def build_model(self, task: str, backbone: str, decoder: str, fusion: str = "diff", num_dates: int = 2,
                        necks: list[dict] | None = None, aux_decoders=None, **kwargs: Any) -> nn.Module:
            if task != CHANGE_DETECTION.factory_task:  # "segmentation", TerraTorch's word for it
                raise ConfigError([f"task: change detection segments change; {task!r} is not supported"])
            encoder, rest, necks = temporal_backbone(backbone, fusion, num_dates, kwargs, necks)
            return EncoderDecoderFactory().build_model(task=task, backbone=encoder, decoder=decoder, necks=necks,
                                                       aux_decoders=aux_decoders, **rest)

    MODEL_FACTORY_REGISTRY.register(TemporalEncoderDecoderFactory)
