import pytest
import yaml

from trainer import terratorch_compat
from trainer.config import load_experiment
from trainer.errors import ConfigError

LIGHTNING = """
seed_everything: 7
trainer:
  accelerator: auto
  strategy: auto
  devices: auto
  max_epochs: 3
  precision: bf16-mixed
  accumulate_grad_batches: 2
  gradient_clip_val: 0.5
  log_every_n_steps: 5
  default_root_dir: runs/tt
  callbacks: []
data:
  class_path: terratorch.datamodules.GenericNonGeoSegmentationDataModule
  init_args:
    batch_size: 4
    num_workers: 0
    num_classes: 2
    train_data_root: d/train/img
model:
  class_path: terratorch.tasks.SemanticSegmentationTask
  init_args:
    model_factory: EncoderDecoderFactory
    model_args:
      backbone: prithvi_eo_tiny
      backbone_pretrained: false
      backbone_bands: [BLUE, GREEN, RED]
      necks: [{name: SelectIndices, indices: [0, 1, 2, 3]}]
      decoder: UNetDecoder
      decoder_channels: [32, 16, 8, 4]
      num_classes: 2
    loss: ce
    ignore_index: -1
    freeze_backbone: true
    plot_on_val: false
optimizer:
  class_path: torch.optim.AdamW
  init_args: {lr: 2.0e-4, weight_decay: 0.05}
lr_scheduler:
  class_path: ReduceLROnPlateau
  init_args: {monitor: val/loss}
"""


def test_lightning_config_translates(tmp_path):
    p = tmp_path / "tt.yaml"
    p.write_text(LIGHTNING)
    exp = load_experiment(p, ["memory.profile=zero3_offload", "model.init_args.loss=dice"])
    # model/data/optimizer/lr_scheduler are kept verbatim for TerraTorch's own parser (a LightningCLI override
    # like model.init_args.loss applies to the file before that)
    tt = exp.terratorch
    assert tt.config["model"]["init_args"]["model_args"]["backbone"] == "prithvi_eo_tiny"
    assert tt.config["model"]["init_args"]["loss"] == "dice"
    assert tt.config["data"]["init_args"]["train_data_root"] == "d/train/img"
    assert tt.config["lr_scheduler"]["class_path"] == "ReduceLROnPlateau"
    assert tt.source == str(p) and tt.eval_every_epochs == 1
    assert exp.task.name == "segmentation" and exp.task.num_classes == 2 and exp.data.batch_size == 4
    assert exp.run.max_epochs == 3 and exp.run.max_steps is None
    assert exp.run.precision == "bf16" and exp.run.grad_accum == 2 and exp.run.grad_clip == 0.5
    assert exp.run.seed == 7 and exp.run.log_every == 5 and exp.checkpoint.dir == "runs/tt"
    assert exp.memory.profile == "zero3_offload"
    notes = "\n".join(terratorch_compat.NOTES)
    assert "trainer.callbacks" in notes and "trainer.devices" in notes and "trainer.strategy" in notes


def test_lightning_defaults_follow_lightning(tmp_path):
    raw = yaml.safe_load(LIGHTNING)
    for k in ("max_epochs", "gradient_clip_val", "check_val_every_n_epoch"):
        raw["trainer"].pop(k, None)
    raw.pop("seed_everything")
    p = tmp_path / "tt.yaml"
    p.write_text(yaml.safe_dump(raw))
    exp = load_experiment(p)
    assert exp.run.max_epochs == 1000 and exp.run.max_steps is None  # Lightning's default length
    assert exp.run.grad_clip is None  # Lightning clips only when asked
    assert exp.run.seed == 0  # TerraTorch's CLI default seed
    assert exp.terratorch.eval_every_epochs == 1


def test_lightning_config_unsupported_fields_are_errors(tmp_path):
    raw = yaml.safe_load(LIGHTNING)
    raw["model"]["class_path"] = "terratorch.tasks.ObjectDetectionTask"
    raw["trainer"]["overfit_batches"] = 2
    raw["trainer"]["gradient_clip_algorithm"] = "value"
    raw["trainer"]["precision"] = "64"
    raw["trainer"]["limit_val_batches"] = 1.0  # Lightning's default: a note, not an error
    raw["trainer"]["warp_speed"] = True
    raw["ckpt_path"] = "last.ckpt"
    p = tmp_path / "tt.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    text = "\n".join(e.value.issues)
    for key in ("model.class_path", "trainer.overfit_batches", "trainer.gradient_clip_algorithm",
                "trainer.precision", "trainer.warp_speed", "ckpt_path"):
        assert key in text
    assert "limit_val_batches" not in text
    assert len(e.value.issues) == 6


def test_lightning_config_without_data_is_an_error(tmp_path):
    raw = yaml.safe_load(LIGHTNING)
    raw.pop("data")
    p = tmp_path / "tt.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    assert any(i.startswith("data:") for i in e.value.issues)
