"""Stock TerraTorch-format configs train unchanged, and terrascale's first-batch loss is TerraTorch's.

In-process (one TerraTorch import for the module): for each config `tt_configs` writes, TerraTorch's own
`build_lightning_cli(["--config", file], run=False)` gives its task and datamodule; the same samples terrascale's
sampler puts in the first batch go through TerraTorch's collate, `on_after_batch_transfer` (under its
Trainer's training state) and `task.training_step`. terrascale's `trainer.train.run.setup` builds the same file under a
memory profile; its loss on its first batch must equal TerraTorch's, and a few optimizer steps on that batch
must lower it. Two tiny subprocess runs through launch/train.py cover zero3_offload on 1 and 2 processes.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.integration import tt_configs as C
from tests.integration.helpers import check, metrics, run_train


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("tt_data")
    return {"segmentation": C.write_tiles(base / "seg", "segmentation"),
            "regression": C.write_tiles(base / "reg", "regression"),
            "multimodal": C.write_multimodal(base / "mm")}


def _root(roots, name):
    kind, _, data_kind = C.configs()[name]
    return roots["multimodal"] if data_kind == "multimodal" else roots[kind]


def terratorch_loss(config, indices):
    """TerraTorch's own training_step loss on the samples `indices` of its train dataset.

    The objects come from TerraTorch's CLI class (MyLightningCLI, run=False) without its Trainer: with
    terratorch 1.2.11, `build_lightning_cli` itself fails on these files once the Trainer is instantiated
    (jsonargparse re-validates model_args after the factory turned `backbone_bands` into HLSBands enums), so
    the reference shares terrascale's way of building; what it does not share is the data path (TerraTorch's
    dataset, collate, `on_after_batch_transfer` under a Lightning Trainer's training state) and the step
    (`task.training_step`)."""
    from lightning.pytorch import Trainer

    from trainer.config import load_experiment
    from trainer.model.terratorch_task import instantiate

    exp = load_experiment(config)
    built = instantiate(exp.terratorch, exp.run.seed)  # a fresh build: own seed_everything, own objects
    dm, task = built.datamodule, built.task
    dm.setup("fit")
    collate = getattr(dm, "collate_fn", None) or torch.utils.data.default_collate
    batch = collate([dm.train_dataset[i] for i in indices])
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.training = True
    dm.trainer = trainer
    batch = dm.on_after_batch_transfer(batch, 0)
    task.train()
    torch.manual_seed(0)
    return task.training_step(batch, 0).detach(), task.model.state_dict()


def first_indices(job):
    job.sampler.set_epoch(0)
    return list(iter(job.sampler))[: job.exp.data.batch_size]


CASES = [(name, "full") for name in C.configs()] + [("encdec_prithvi_ce_weights", "lora"),
                                                    ("encdec_terramind_dice", "lora")]


@pytest.mark.parametrize("name,profile", CASES)
def test_first_batch_loss_is_terratorchs_and_falls(tmp_path, roots, name, profile):
    from trainer.config import load_experiment
    from trainer.train.loop import epoch_loader
    from trainer.train.run import setup

    config = C.write_config(tmp_path, name, _root(roots, name))
    exp = load_experiment(config, [f"memory.profile={profile}", f"checkpoint.dir={tmp_path / 'job'}"])
    job = setup(exp)
    assert job.task_steps is not None
    held = {id(p) for g in job.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in job.accelerator.unwrap_model(job.model).parameters() if p.requires_grad}
    assert held == trainable  # the file's optimizer block holds what the profile trains (LoRA adapters too)
    batch = next(iter(epoch_loader(job.train_loader, job.sampler, job.train_ds, 0)))
    job.model.train()
    torch.manual_seed(0)
    ours = job.task_steps.train_loss(job.model, batch)

    ref, ref_state = terratorch_loss(config, first_indices(job))
    if profile == "full":  # same seed, same factory: the same initial weights
        state = job.accelerator.unwrap_model(job.model).state_dict()
        assert state.keys() == ref_state.keys()
        for k in state:
            torch.testing.assert_close(state[k], ref_state[k], msg=k)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)
    aux = C.configs()[name][1]["init_args"].get("aux_loss")
    if aux:  # the aux heads exist and their weighted terms are in the loss (not only equal on both sides)
        x, y, rest = job.task_steps.batch(batch, "train")
        torch.manual_seed(0)
        out = job.model(x, **rest)
        assert set(out.auxiliary_heads) == set(aux)
        crit = job.task_steps.task.criterion
        terms = {k: crit(out.auxiliary_heads[k].float(), y) for k in aux}
        assert all(float(t.detach()) > 0 for t in terms.values()), terms
        by_hand = crit(out.output.float(), y) + sum(w * terms[k] for k, w in aux.items())
        torch.testing.assert_close(ours.detach(), by_hand.detach(), rtol=1e-5, atol=1e-6)

    losses = []
    for _ in range(6):  # the task's own optimizer (the file's optimizer block) on the profile's trainable params
        torch.manual_seed(0)
        loss = job.task_steps.train_loss(job.model, batch)
        job.accelerator.backward(loss)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


def test_lightning_sections_become_run_keys_and_notes(tmp_path, roots):
    from trainer import terratorch_compat
    from trainer.config import load_experiment

    config = C.write_config(tmp_path, "encdec_prithvi_ce_weights", roots["segmentation"])
    exp = load_experiment(config, ["trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
                                   "trainer.gradient_clip_val=0.5", "memory.profile=zero3_offload"])
    assert exp.run.max_steps == 3 and exp.run.grad_accum == 2 and exp.run.grad_clip == 0.5
    assert exp.run.seed == 7 and exp.terratorch.eval_every_epochs == 1 and exp.memory.profile == "zero3_offload"
    notes = "\n".join(terratorch_compat.NOTES)
    assert "trainer.callbacks" in notes and "trainer.logger" in notes and "trainer.devices" in notes


def test_reduce_lr_on_plateau_steps_on_val_loss(tmp_path, roots):
    """The file's ReduceLROnPlateau block: stepped at epoch ends with the val loss (patience 0 -> cut)."""
    from trainer.config import load_experiment
    from trainer.train.run import setup

    config = C.write_config(tmp_path, "smp_unet_ce", roots["segmentation"])
    exp = load_experiment(config, ["lr_scheduler.init_args.patience=0", "lr_scheduler.init_args.factor=0.5",
                                   f"checkpoint.dir={tmp_path / 'job'}"])
    job = setup(exp)
    sched = job.scheduler
    lr0 = job.optimizer.param_groups[0]["lr"]
    for value in (1.0, 2.0):  # epoch 1: best=1.0; epoch 2: worse -> cut (patience 0)
        for _ in range(job.per_epoch):
            sched.step()
        sched.observe({"split": "val", "step": 0, "loss": value})
    assert job.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)
    state = sched.state_dict()
    import json

    json.dumps(state)  # checkpointed as JSON


@pytest.mark.parametrize("nproc", [1, 2])
def test_zero3_offload_trains_stock_config(tmp_path, roots, nproc):
    """launch/train.py on a TerraTorch file + memory.profile=zero3_offload; 1 process: the first logged loss is
    TerraTorch's on the same batch; 2 processes: the mean of TerraTorch's on each rank's batch."""
    from trainer.train.loop import EpochSampler

    config = C.write_config(tmp_path, "encdec_prithvi_ce_weights", roots["segmentation"])
    job = tmp_path / "job"
    r = check(run_train(["memory.profile=zero3_offload", "trainer.max_steps=4", f"checkpoint.dir={job}",
                         "run.progress=false"], nproc=nproc, config=config, timeout=900))
    train = metrics(job)
    assert [rec["step"] for rec in train] == [1, 2, 3, 4], r.stdout[-2000:]
    assert all(math.isfinite(rec["loss"]) for rec in train)
    assert metrics(job, "val"), "validation at the epoch end"
    assert (job / "export" / "model.safetensors").is_file()
    bs, n_train = 2, 8
    per_epoch = n_train // (bs * nproc)
    order = list(iter(EpochSampler(n_train, per_epoch * bs * nproc, seed=7)))
    refs = [terratorch_loss(config, order[rank * bs:(rank + 1) * bs])[0] for rank in range(nproc)]
    torch.testing.assert_close(torch.tensor(train[0]["loss"]), torch.stack(refs).mean().float(),
                               rtol=1e-4, atol=1e-5)
