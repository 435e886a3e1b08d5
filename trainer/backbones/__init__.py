"""terrascale's backbones: HF VLMs/LLMs and Clay/SatMAE registered into TerraTorch's backbone registry,
the necks of `necks` (ProjectChannels) into its neck registry, plus `catalog` (real dimensions, meta builds)
for the memory planner.

Importing this package is cheap on purpose (the planner imports `trainer.backbones.catalog`, which
runs this file first): TerraTorch is imported only by `register_all()`.
"""
from __future__ import annotations

_registered = False


def register_all() -> list[str]:
    """Register every backbone in `factory.REGISTERED` and every neck in `necks.NECKS` with TerraTorch; safe to
    call any number of times. Returns the backbone names."""
    global _registered
    from trainer.backbones.factory import REGISTERED

    if not _registered:
        from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY  # 11–17 s the first time

        for name in REGISTERED:
            if name not in TERRATORCH_BACKBONE_REGISTRY:
                TERRATORCH_BACKBONE_REGISTRY.register(_constructor(name))
        from trainer.backbones.necks import register_necks

        register_necks()
        _registered = True
    return list(REGISTERED)


def _constructor(name: str):
    from trainer.backbones.factory import build_backbone

    def build(**kwargs):
        return build_backbone(name, **kwargs)

    # TerraTorch's Registry keys constructors by __name__
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"terrascale backbone {name!r} (see trainer.backbones.factory.build_backbone)."
    return build
