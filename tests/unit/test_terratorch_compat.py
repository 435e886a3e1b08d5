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
    exp = load_experiment(p, ["memory.profile=zero3_offload"])
    assert exp.task.name == "segmentation" and exp.task.num_classes == 2 and exp.task.ignore_index == -1
    assert exp.model.backbone == "prithvi_eo_tiny"
    assert exp.model.backbone_kwargs == {"pretrained": False, "bands": ["BLUE", "GREEN", "RED"]}
    assert exp.model.decoder_kwargs == {"channels": [32, 16, 8, 4]}
    assert exp.model.freeze_backbone is True
    assert exp.data.kind == "terratorch" and exp.data.batch_size == 4
    assert exp.data.terratorch.init_args["train_data_root"] == "d/train/img"
    assert exp.run.max_epochs == 3 and exp.run.max_steps is None
    assert exp.run.precision == "bf16" and exp.run.grad_accum == 2 and exp.run.grad_clip == 0.5
    assert exp.run.seed == 7 and exp.checkpoint.dir == "runs/tt"
    assert exp.optim.lr == pytest.approx(2e-4) and exp.optim.weight_decay == pytest.approx(0.05)
    assert exp.memory.profile == "zero3_offload"
    notes = "\n".join(terratorch_compat.NOTES)
    assert "ReduceLROnPlateau" in notes and "trainer.callbacks" in notes and "plot_on_val" in notes


def test_lightning_config_unsupported_fields_are_errors(tmp_path):
    raw = yaml.safe_load(LIGHTNING)
    raw["model"]["init_args"]["loss"] = "lovasz"
    raw["model"]["init_args"]["model_args"]["rescale"] = False
    raw["trainer"]["overfit_batches"] = 2
    p = tmp_path / "tt.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    text = "\n".join(e.value.issues)
    assert "model.init_args.loss: 'lovasz'" in text
    assert "model.init_args.model_args.rescale" in text
    assert "trainer.overfit_batches" in text
    assert len(e.value.issues) == 3
