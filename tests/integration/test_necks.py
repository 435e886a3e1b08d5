"""ProjectChannels: the channel-reducing neck of the large-VLM configs.

- It is found by name through TerraTorch's EncoderDecoderFactory after `register_all()`, sits between
  ReshapeTokensToImage and LearnedInterpolateToPyramidal on a tiny InternVL (full mode), and trains: the
  projections and the backbone receive gradients and an optimizer step changes the projections.
- At InternVL2-40B width (7168 channels x 4 maps) the neck + UNet decoder of the shipped configs hold a small
  fraction of the parameters of the old LearnedInterpolateToPyramidal-on-7168 path (counted on the meta device).
- Bad arguments are ConfigErrors naming `model.necks`.
"""
from __future__ import annotations

import pytest
import torch

from trainer.backbones import register_all
from trainer.errors import ConfigError

OLD = [{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "ReshapeTokensToImage"},
       {"name": "LearnedInterpolateToPyramidal"}]
NEW = [*OLD[:2], {"name": "ProjectChannels", "out_channels": 16}, OLD[2]]  # the tiny tower is 32 wide


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_all()


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_project_channels_builds_by_name_and_trains():
    from terratorch.models import EncoderDecoderFactory

    from trainer.backbones.necks import ProjectChannels

    torch.manual_seed(0)
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="internvl2_40b", backbone_tiny=True, backbone_mode="full",
        backbone_in_channels=6, backbone_image_size=32, necks=NEW, decoder="UNetDecoder",
        decoder_channels=[32, 16, 8, 4], num_classes=2)
    necks = list(model.neck)
    proj = necks[2]
    assert isinstance(proj, ProjectChannels)
    assert [p[0].in_channels for p in proj.projections] == model.encoder.out_channels == [32] * 4
    assert all(p[0].out_channels == 16 for p in proj.projections)
    # LearnedInterpolateToPyramidal was sized from the projected width, not the backbone's
    assert necks[3].fpn1[0].in_channels == 16 and necks[3].fpn2[0].in_channels == 16

    before = [p[0].weight.detach().clone() for p in proj.projections]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(2, 6, 32, 32), torch.randint(0, 2, (2, 32, 32))
    out = model(x).output
    assert out.shape == (2, 2, 32, 32)
    torch.nn.functional.cross_entropy(out, y).backward()
    for i, p in enumerate(proj.projections):
        assert p[0].weight.grad is not None and p[0].weight.grad.abs().sum() > 0, f"projection {i} got no gradient"
    backbone_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad and p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads), "no gradient reached the backbone"
    opt.step()
    assert all(not torch.equal(b, p[0].weight) for b, p in zip(before, proj.projections))


def test_neck_and_decoder_at_40b_width_are_far_below_the_old_path():
    from terratorch.models.decoders.unet_decoder import UNetDecoder
    from terratorch.models.necks import build_neck_list

    width = [7168] * 4  # InternVL2-40B's language model (Yi-34B) hidden size
    shipped = [{"name": "ReshapeTokensToImage"}, {"name": "ProjectChannels", "out_channels": 256},
               {"name": "LearnedInterpolateToPyramidal"}]
    counts = {}
    with torch.device("meta"):  # no memory: the old path alone is ~0.9 GB of fp32 weights
        for label, necks in (("old", [OLD[1], OLD[2]]), ("new", shipped)):
            neck_list, channels = build_neck_list(necks, width)
            decoder = UNetDecoder(channels, [128, 64, 32, 16])
            counts[label] = (sum(_trainable(n) for n in neck_list), _trainable(decoder))
    old_neck, old_decoder = counts["old"]
    new_neck, new_decoder = counts["new"]
    # the issue's figure: 231M trainable parameters in LearnedInterpolateToPyramidal at 7168 channels
    assert 230e6 < old_neck < 232e6, old_neck
    # 4 x (7168 x 256) projections + GroupNorm, then the pyramid and decoder at 256 channels: ~8.5M in all
    assert 7.3e6 < new_neck < 7.8e6, new_neck
    assert new_neck + new_decoder < 10e6, (new_neck, new_decoder)
    assert (new_neck + new_decoder) * 25 < old_neck + old_decoder, counts


@pytest.mark.parametrize("kwargs,match", [({"out_channels": 30}, "multiple of 4"),
                                          ({"out_channels": 0}, "multiple of 4"),
                                          ({"out_channels": True}, "multiple of 4")])
def test_bad_out_channels_is_a_config_error(kwargs, match):
    from trainer.backbones.necks import ProjectChannels

    with pytest.raises(ConfigError, match=match) as e:
        ProjectChannels([64] * 4, **kwargs)
    assert "model.necks" in e.value.issues[0]


def test_token_features_are_refused_with_the_fix():
    from trainer.backbones.necks import ProjectChannels

    neck = ProjectChannels([8] * 2, out_channels=4)
    with pytest.raises(ValueError, match="put ReshapeTokensToImage before it"):
        neck([torch.randn(1, 5, 8)] * 2)
