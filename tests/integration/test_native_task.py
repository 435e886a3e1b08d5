"""The native schema builds through the same path as a `terratorch fit` file: TerraTorch's task, trained by terrascale.

For the shipped forest / InSAR / change-detection configs (tiny Prithvi), `trainer.train.run.setup` builds the job; its
first-batch loss, as the loop computes it, equals the TerraTorch task's own `training_step` on the same batch, with
the same initial weights (a fresh task built with the same seed), and a few optimizer steps lower it.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.integration.helpers import ROOT

CONFIGS = {"forest": "prithvi_forest", "insar": "prithvi_insar", "change": "prithvi_change"}
TINY = ["model.backbone=prithvi_eo_tiny", "model.backbone_kwargs.img_size=32", "data.synthetic.n_train=8",
        "data.synthetic.n_val=4", "data.synthetic.tile_size=32", "data.batch_size=4", "run.max_steps=6",
        "memory.profile=full", "run.progress=false"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_first_batch_loss_is_the_terratorch_tasks(tmp_path, name):
    from accelerate.utils import set_seed

    from trainer.config import load_experiment
    from trainer.model.tasks import build_task
    from trainer.train.loop import epoch_loader
    from trainer.train.run import setup

    exp = load_experiment(ROOT / "launch" / "configs" / f"{CONFIGS[name]}.yaml",
                          [*TINY, f"data.root={tmp_path / 'data'}", f"checkpoint.dir={tmp_path / 'job'}"])
    job = setup(exp)
    batch = next(iter(epoch_loader(job.train_loader, job.sampler, job.train_ds, 0)))
    state = {k: v.clone() for k, v in job.accelerator.unwrap_model(job.model).state_dict().items()}
    job.model.train()
    ours = job.task_steps.train_loss(job.model, batch)

    set_seed(exp.run.seed)  # as setup seeds before building
    task = build_task(exp)
    ref_state = task.model.state_dict()
    assert state.keys() == ref_state.keys()
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], msg=k)
    task.train()
    ref = task.training_step({k: v.clone() for k, v in batch.items()}, 0)
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert math.isfinite(float(ours.detach()))

    losses = []
    for _ in range(5):
        loss = job.task_steps.train_loss(job.model, batch)
        job.accelerator.backward(loss)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
