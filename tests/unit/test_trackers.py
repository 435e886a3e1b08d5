from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.train.trackers import hparams, init_kwargs, offline_env, select_trackers


def only(*names):
    return lambda module: module in names


def test_default_tensorboard_and_missing_ones_are_skipped_with_a_note():
    assert select_trackers(["tensorboard"], only("tensorboard")) == (["tensorboard"], [])
    chosen, notes = select_trackers(["tensorboard", "wandb", "mlflow", "wandb"], only("tensorboard", "mlflow"))
    assert chosen == ["tensorboard", "mlflow"]
    assert notes == ["run.trackers: wandb is not installed (pip install wandb); not logging to it"]


def test_all_means_every_installed_one_silently():
    assert select_trackers(["all"], only("tensorboard", "wandb")) == (["tensorboard", "wandb"], [])
    assert select_trackers([], only("tensorboard")) == ([], [])


def test_unknown_tracker_names_the_key_and_the_nearest():
    with pytest.raises(ConfigError) as e:
        select_trackers(["tensorbord", "comet"], only())
    text = str(e.value)
    assert "run.trackers: unknown tracker 'tensorbord'; did you mean 'tensorboard'?" in text and "'comet'" in text


def test_offline_by_default_but_the_environment_wins(tmp_path):
    env = offline_env(["tensorboard", "wandb", "mlflow"], tmp_path, environ={})
    assert env == {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path.resolve() / "logs"),
                   "MLFLOW_TRACKING_URI": f"file:{tmp_path.resolve() / 'mlruns'}"}
    env = offline_env(["mlflow", "wandb"], tmp_path, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                                               "WANDB_MODE": "online"})
    assert env == {"WANDB_DIR": str(tmp_path.resolve() / "logs")}
    assert offline_env(["tensorboard"], tmp_path, environ={}) == {}


def test_init_kwargs_keep_one_wandb_run_per_job(tmp_path):
    a = init_kwargs(["wandb", "mlflow"], "demo", tmp_path / "job")
    b = init_kwargs(["wandb"], "demo", Path(str(tmp_path / "job")))
    assert a["wandb"]["id"] == b["wandb"]["id"] and a["wandb"]["resume"] == "allow"
    assert a["mlflow"] == {"run_name": "demo"} and init_kwargs(["tensorboard"], "x", tmp_path) == {}


def test_hparams_are_flat_scalars():
    assert hparams({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "name": "x", "data": {"stats": None}}) == {
        "optim.lr": 1e-3, "optim.betas": "[0.9, 0.99]", "name": "x"}
