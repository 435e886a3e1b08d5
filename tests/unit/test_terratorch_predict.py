"""What `predict` reads from a TerraTorch-file job's datamodule section, and what it refuses (no TerraTorch import)."""
import pytest
import yaml

from tests.integration import tt_configs as C
from trainer.config import load_experiment
from trainer.errors import ConfigError
from trainer.predict.terratorch_predict import check_precision, preparation


def _exp(tmp_path, name="encdec_prithvi_ce_weights", **data_init):
    path = C.write_config(tmp_path, name, tmp_path / "data")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["init_args"].update(data_init)
    path.write_text(yaml.safe_dump(cfg))
    return load_experiment(path)


def test_bands_scale_nodata_and_stats_come_from_data_init_args(tmp_path):
    prep = preparation(_exp(tmp_path, dataset_bands=["BLUE", [1, 3], "RED"], output_bands=["RED", 2],
                            constant_scale=0.5, no_data_replace=-1, means=[1.0, 2.0], stds=[3.0, 4.0]))
    assert prep.datamodule == "GenericNonGeoSegmentationDataModule"
    assert prep.file_bands == ["BLUE", 1, 2, 3, "RED"] and prep.indices == [4, 2]  # [a, b]: inclusive interval
    assert (prep.scale, prep.nan_replace, prep.means, prep.stds) == (0.5, -1.0, [1.0, 2.0], [3.0, 4.0])


def test_predict_bands_take_precedence(tmp_path):
    prep = preparation(_exp(tmp_path, predict_dataset_bands=["A", "B", "C"], predict_output_bands=["C", "A"]))
    assert prep.file_bands == ["A", "B", "C"] and prep.indices == [2, 0]


def test_no_bands_named_feeds_every_file_band(tmp_path):
    prep = preparation(_exp(tmp_path, dataset_bands=None, output_bands=None, means=None, stds=None))
    assert prep.indices is None and prep.file_bands is None and prep.means is None


def test_multimodal_datamodule_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError) as e:
        preparation(_exp(tmp_path, "multimodal_terramind_ce"))
    assert "data.class_path" in str(e.value) and "one input per modality" in str(e.value)


def test_tile_transforms_and_time_stacking_are_refused_naming_each_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        preparation(_exp(tmp_path, expand_temporal_dimension=True,
                         test_transform=[{"class_path": "albumentations.CenterCrop", "init_args": {"height": 16,
                                                                                               "width": 16}},
                                         {"class_path": "ToTensorV2"}]))
    assert len(e.value.issues) == 2
    assert "data.init_args.expand_temporal_dimension" in e.value.issues[0]
    assert "data.init_args.test_transform" in e.value.issues[1] and "CenterCrop" in e.value.issues[1]
    assert "ToTensorV2" not in e.value.issues[1].split("applies only")[0]


def test_output_bands_outside_dataset_bands_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.init_args.output_bands"):
        preparation(_exp(tmp_path, output_bands=["RED", "THERMAL"]))


def test_precision_other_than_fp32_is_refused():
    assert check_precision(None) == check_precision("fp32") == "fp32"
    with pytest.raises(ConfigError, match="--precision bf16"):
        check_precision("bf16")
