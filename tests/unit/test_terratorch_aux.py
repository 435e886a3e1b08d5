"""How terrascale hands TerraTorch's aux head forms to terratorch 1.2.11's parser (trainer.model.terratorch_task)."""
import pytest

from trainer.errors import ConfigError
from trainer.model.terratorch_task import _typed_aux_heads

HEAD = {"name": "aux_head", "decoder": "FCNDecoder", "decoder_args": {"decoder_channels": 16}}
FULL = "terratorch.models.model.AuxiliaryHead"


def _args(**init):
    return {"model": {"class_path": "SemanticSegmentationTask", "init_args": {"model_args": {}, **init}}}


def test_plain_and_short_forms_become_the_full_class_path():
    args = _args(aux_heads=[dict(HEAD), {"class_path": "AuxiliaryHead", "init_args": dict(HEAD)},
                            {"class_path": FULL, "init_args": dict(HEAD)}], aux_loss={"aux_head": 0.4})
    _typed_aux_heads(args, None)
    heads = args["model"]["init_args"]["aux_heads"]
    assert heads == [{"class_path": FULL, "init_args": HEAD}] * 3
    assert args["model"]["init_args"]["aux_loss"] == {"aux_head": 0.4}


def test_no_aux_heads_is_left_alone():
    args = _args(loss="ce")
    _typed_aux_heads(args, None)
    assert args == _args(loss="ce")


def test_aux_decoders_in_model_args_names_the_key_and_the_fix():
    args = _args()
    args["model"]["init_args"]["model_args"]["aux_decoders"] = [dict(HEAD)]
    with pytest.raises(ConfigError) as e:
        _typed_aux_heads(args, "x.yaml")
    msg = str(e.value)
    assert "model.init_args.model_args.aux_decoders" in msg and "model.init_args.aux_heads" in msg
    assert "aux_loss" in msg and "x.yaml" in msg
