from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import run_python
from trainer.config import DEMO_CONFIG, apply_overrides, build_experiment, load_experiment
from trainer.errors import ConfigError
from trainer.plan.fit_table import shipped_experiments


def test_demo_config_loads():
    exp = load_experiment(DEMO_CONFIG)
    assert exp.model.backbone == "prithvi_eo_tiny"
    assert exp.memory.profile == "zero3_offload"


def test_overrides_are_typed_yaml_scalars():
    exp = load_experiment(DEMO_CONFIG, ["optim.lr=3e-4", "run.grad_clip=null", "data.bands=[1,2,3]",
                                        "checkpoint.resume=false"])
    assert exp.optim.lr == pytest.approx(3e-4)
    assert exp.run.grad_clip is None
    assert exp.data.bands == [1, 2, 3]
    assert exp.checkpoint.resume is False


def test_every_problem_reported_at_once_with_suggestions(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"optim": {"lr": -1, "weight_decy": 0.1}, "data": {"batch_size": 0},
                                   "task": {"num_classes": 3, "class_weights": [1.0, 2.0]}}))
    with pytest.raises(ConfigError) as e:
        load_experiment(cfg)
    msgs = e.value.issues
    assert len(msgs) == 5, msgs  # the four below and the missing model section
    joined = "\n".join(msgs)
    assert "model: section missing" in joined
    assert "optim.weight_decy: unknown key; did you mean 'optim.weight_decay'?" in joined
    assert "optim.lr" in joined and "greater than 0" in joined
    assert "data.batch_size" in joined
    assert "task.class_weights has 2 entries but task.num_classes is 3" in joined
    assert str(cfg) in str(e.value)


def test_unknown_section_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        build_experiment({"modle": {}})
    assert "did you mean 'model'" in e.value.issues[0]


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="write it as key=value"):
        apply_overrides({}, ["optim.lr"])


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_experiment(tmp_path / "does-not-exist.yaml")


def test_resume_true_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        build_experiment({"checkpoint": {"resume": True}})


def test_cli_prints_all_problems_and_exits_2(tmp_path):
    # two rounds, each complete: the pure problems (no TerraTorch import, seconds), then the registry ones (the
    # backbone's real constructor has no img_sz) once the pure ones are fixed
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim: {lr: 0}\nrun: {max_step: 3}\nmodel: {backbone: prithvi_eo_tiny}\n")
    train = DEMO_CONFIG.parents[2] / "launch" / "train.py"
    r = run_python([train, "--config", cfg, "data.num_workrs=1", "model.backbone_kwargs.img_sz=64",
                    f"checkpoint.dir={tmp_path / 'job'}"], cwd=Path.cwd(), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "3 problem(s)" in r.stderr
    assert "run.max_step: unknown key; did you mean 'run.max_steps'?" in r.stderr
    assert "data.num_workrs: unknown key; did you mean 'data.num_workers'?" in r.stderr
    assert "optim.lr" in r.stderr and "checked against TerraTorch's registries" in r.stderr
    assert "img_sz" not in r.stderr
    cfg.write_text("optim: {lr: 0.001}\nrun: {max_steps: 3}\nmodel: {backbone: prithvi_eo_tiny}\n")
    r = run_python([train, "--config", cfg, "model.backbone_kwargs.img_sz=64", f"checkpoint.dir={tmp_path / 'job'}"],
                   cwd=Path.cwd(), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "1 problem(s)" in r.stderr
    assert "model.backbone_kwargs.img_sz: not an argument of TerraTorch's prithvi_eo_tiny; did you mean " \
           "'model.backbone_kwargs.img_size'?" in r.stderr
    assert not (tmp_path / "job").exists()  # refused before anything started


def test_missing_model_section_is_reported_with_the_rest(tmp_path):
    cfg = tmp_path / "no_model.yaml"
    cfg.write_text("optim: {lr: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(cfg)
    assert len(e.value.issues) == 2 and e.value.issues[0].startswith("model: section missing"), e.value.issues


_EXPERIMENTS = shipped_experiments()


def test_shipped_experiments_discovered():
    assert len(_EXPERIMENTS) >= 13
    assert {p.stem for p in _EXPERIMENTS} >= {"demo", "prithvi_forest", "internvl2_26b_change"}


@pytest.mark.parametrize("path", _EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiment_loads(path):
    exp = load_experiment(path)
    assert exp.model.backbone and exp.task.name in ("segmentation", "regression", "change_detection")


def test_memory_profile_is_typed_with_the_profiles_names():
    from trainer.config import PROFILE_NAMES
    from trainer.memory.profiles import PROFILES

    assert tuple(PROFILES) == PROFILE_NAMES  # one list of names: the config's type and the profiles agree
    with pytest.raises(ConfigError, match=r"memory.profile: Input should be 'full'.*\(got 'zero3_ofload'\); did you "
                                          r"mean 'zero3_offload'\?"):
        load_experiment(None, ["memory.profile=zero3_ofload"])
    assert load_experiment(None, ["memory.profile=auto"]).memory.profile == "auto"


def test_auto_with_an_own_deepspeed_json_is_refused_naming_both_keys():
    """auto plans its candidates on their own presets; a user JSON would run under a choice never planned with it
    (and make a profile without DeepSpeed a DeepSpeed one)."""
    with pytest.raises(ConfigError, match=r"memory.deepspeed: 'my_ds.json' cannot be combined with memory.profile: "
                                          r"auto.*name the profile the JSON is for"):
        load_experiment(None, ["memory.profile=auto", "memory.deepspeed=my_ds.json"])
    exp = load_experiment(None, ["memory.profile=zero3_offload", "memory.deepspeed=zero3_bf16_offload_all"])
    assert exp.memory.deepspeed == "zero3_bf16_offload_all"
