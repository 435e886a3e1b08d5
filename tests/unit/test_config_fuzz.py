"""Mutated shipped configs: every mutation is a ConfigError naming the mutated key (exit 2 in the CLI), found at
load by `trainer.train.validate.load_checked`; valid mutations load. In-process, one TerraTorch import for all (the
launcher's exit 2 without a traceback: tests/unit/test_config.py::test_cli_prints_all_problems_and_exits_2)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from trainer.errors import ConfigError
from trainer.plan.fit_table import shipped_experiments
from trainer.train.validate import load_checked

SHIPPED = {p.stem: p for p in shipped_experiments()}


def _raw(name: str) -> dict:
    return yaml.safe_load(SHIPPED[name].read_text())


def _set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


def _typo(key: str) -> str:
    return key[:-2] + key[-1] if len(key) > 3 else key + "x"  # drop the second-to-last letter


def _per_config_mutations() -> list[tuple[str, str, callable, str]]:
    """(id, config, mutate(raw) -> raw, the key the error must name) for every shipped config."""
    out = []
    for name in sorted(SHIPPED):
        raw = _raw(name)
        first = next(iter(raw["model"].get("backbone_kwargs") or {"img_size": 1}))
        bad = _typo(first)

        def typo_kwarg(r, first=first, bad=bad):
            r["model"].setdefault("backbone_kwargs", {})[bad] = r["model"]["backbone_kwargs"].pop(first, 1)
            return r

        out += [
            (f"{name}-backbone_kwargs-typo", name, typo_kwarg, f"model.backbone_kwargs.{bad}"),
            (f"{name}-decoder-unknown", name, lambda r: _set(r, "model.decoder", r["model"]["decoder"] + "2"),
             "model.decoder"),
            (f"{name}-decoder_kwargs-typo", name, lambda r: _set(r, "model.decoder_kwargs.chanels", [8]),
             "model.decoder_kwargs.chanels"),
            (f"{name}-neck-unknown", name, lambda r: r["model"]["necks"][0].update(name="SelectIndexes") or r,
             "model.necks[0].name"),
            (f"{name}-neck-kwarg-typo", name, lambda r: r["model"]["necks"][0].update(indces=[0]) or r,
             "model.necks[0].indces"),
        ]
    return out


def _write_raw(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    return path


# (id, config, mutate, key). mutate may also return bytes: the file's content.
SCALAR = [
    ("img_sz-typo", "demo", lambda r: _set(r, "model.backbone_kwargs.img_sz", 64), "model.backbone_kwargs.img_sz"),
    ("img_size-not-patch-multiple", "demo", lambda r: _set(r, "model.backbone_kwargs.img_size", 100),
     "model.backbone_kwargs.img_size"),
    ("img_size-negative", "prithvi_forest", lambda r: _set(r, "model.backbone_kwargs.img_size", -64),
     "model.backbone_kwargs.img_size"),
    ("img_size-text", "terramind_forest", lambda r: _set(r, "model.backbone_kwargs.img_size", "big"),
     "model.backbone_kwargs.img_size"),
    ("in_chans-set-by-prithvi", "demo", lambda r: _set(r, "model.backbone_kwargs.in_chans", 3),
     "model.backbone_kwargs.in_chans"),
    ("band-typo-prithvi", "demo", lambda r: _set(r, "model.backbone_kwargs.bands", ["BLUE", "GREN", "RED"]),
     "model.backbone_kwargs.bands"),
    ("band-typo-terramind", "terramind_forest",
     lambda r: _set(r, "model.backbone_kwargs.bands", {"S2L2A": ["BLUE", "NIR_BORAD"]}), "model.backbone_kwargs.bands.S2L2A"),
    ("bands-key-not-a-modality", "terramind_forest",
     lambda r: _set(r, "model.backbone_kwargs.bands", {"S1GRD": ["VV"]}), "model.backbone_kwargs.bands.S1GRD"),
    ("backbone-unknown", "demo", lambda r: _set(r, "model.backbone", "prithvi_eo_tiniest"), "model.backbone"),
    ("our-backbone-kwarg-typo", "internvl2_26b_insar", lambda r: _set(r, "model.backbone_kwargs.imag_size", 224),
     "model.backbone_kwargs.imag_size"),
    ("neck-without-name", "demo", lambda r: r["model"]["necks"][1].pop("name") and r, "model.necks[1]"),
    ("head_kwargs-typo", "prithvi_insar", lambda r: _set(r, "model.head_kwargs.dropot", 0.1),
     "model.head_kwargs.dropot"),
    ("head_kwargs-num_classes", "demo", lambda r: _set(r, "model.head_kwargs.num_classes", 3),
     "model.head_kwargs.num_classes"),
    ("num_classes-1", "demo", lambda r: _set(r, "task.num_classes", 1), "task.num_classes"),
    ("num_classes-0", "prithvi_change", lambda r: _set(r, "task.num_classes", 0), "task.num_classes"),
    ("lr-inf", "demo", lambda r: _set(r, "optim.lr", float("inf")), "optim.lr"),
    ("lr-nan", "terramind_insar", lambda r: _set(r, "optim.lr", float("nan")), "optim.lr"),
    ("lr-negative", "demo", lambda r: _set(r, "optim.lr", -1e-3), "optim.lr"),
    ("lr-huge", "demo", lambda r: _set(r, "optim.lr", 1e4), "optim.lr"),
    ("betas-above-1", "demo", lambda r: _set(r, "optim.betas", [1.5, 0.999]), "optim.betas"),
    ("momentum-1", "demo", lambda r: _set(r, "optim.momentum", 1.0), "optim.momentum"),
    ("grad_clip-inf", "demo", lambda r: _set(r, "run.grad_clip", float("inf")), "run.grad_clip"),
    ("max_steps-1e30", "demo", lambda r: _set(r, "run.max_steps", 1e30), "run.max_steps"),
    ("max_steps-text-1e30", "demo", lambda r: _set(r, "run.max_steps", "1e30"), "run.max_steps"),
    ("max_steps-0", "earthmind_forest", lambda r: _set(r, "run.max_steps", 0), "run.max_steps"),
    ("tile_size-1e6", "demo", lambda r: _set(r, "data.synthetic.tile_size", 1e6), "data.synthetic.tile_size"),
    ("tile_size-8", "prithvi_insar", lambda r: _set(r, "data.synthetic.tile_size", 8), "data.synthetic.tile_size"),
    ("batch_size-0", "demo", lambda r: _set(r, "data.batch_size", 0), "data.batch_size"),
    ("batch_size-1e9", "demo", lambda r: _set(r, "data.batch_size", 10**9), "data.batch_size"),
    ("warmup-negative", "demo", lambda r: _set(r, "scheduler.warmup_steps", -1), "scheduler.warmup_steps"),
    ("resume-missing-path", "demo", lambda r: _set(r, "checkpoint.resume", "/no/such/step-000040"),
     "checkpoint.resume"),
    ("section-typo", "demo", lambda r: r.update(optimm=r.pop("optim")) or r, "optimm"),
    ("missing-model-section", "demo", lambda r: r.pop("model") and r, "model"),
    ("model-null", "demo", lambda r: _set(r, "model", None), "model"),
    ("empty-file", "demo", lambda r: b"", "is empty"),
    ("comments-only-file", "demo", lambda r: b"# nothing here\n", "is empty"),
    ("non-utf8-file", "demo", lambda r: "name: d\u00e9mo\nmodel: {backbone: prithvi_eo_tiny}\n".encode("latin-1"),
     "is not UTF-8"),
    ("list-file", "demo", lambda r: b"- model\n- data\n", "must hold a mapping"),
    ("not-yaml", "demo", lambda r: b"model: [unclosed\n", "is not valid YAML"),
]

VALID = [
    ("img_size-128", "demo", lambda r: _set(r, "model.backbone_kwargs.img_size", 128)),
    ("prithvi-drop_path", "prithvi_forest", lambda r: _set(r, "model.backbone_kwargs.drop_path", 0.1)),
    ("prithvi-new-sar-band", "demo", lambda r: _set(r, "model.backbone_kwargs.bands",
                                                    ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "VV"])),
    ("terramind-img_size", "terramind_change", lambda r: _set(r, "model.backbone_kwargs.img_size", 224)),
    ("decoder-use_batchnorm", "demo", lambda r: _set(r, "model.decoder_kwargs.use_batchnorm", False)),
    ("head-dropout", "demo", lambda r: _set(r, "model.head_kwargs.dropout", 0.1)),
    ("neck-indices", "prithvi_forest", lambda r: r["model"]["necks"][0].update(indices=[0, 1, 2, 3]) or r),
    ("lr-small", "internvl2_26b_forest", lambda r: _set(r, "optim.lr", 3e-6)),
    ("regression-num_classes-ignored", "prithvi_insar", lambda r: _set(r, "task.num_classes", 1)),
    ("resume-false", "demo", lambda r: _set(r, "checkpoint.resume", False)),
    ("nodata-nan", "demo", lambda r: _set(r, "data.nodata", float("nan"))),
    ("our-image_size", "internvl2_26b_insar", lambda r: _set(r, "model.backbone_kwargs.image_size", 448)),
]


def _apply(name: str, mutate, tmp_path: Path) -> Path:
    out = mutate(copy.deepcopy(_raw(name)))
    path = tmp_path / f"{name}.yaml"
    if isinstance(out, bytes):
        return _write_raw(path, out)
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


CASES = _per_config_mutations() + SCALAR


def test_enough_mutations():
    assert len(SHIPPED) >= 13 and len(CASES) >= 50 and len(VALID) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mutation_is_a_config_error_naming_the_key(case, tmp_path):
    _, name, mutate, key = case
    path = _apply(name, mutate, tmp_path)
    with pytest.raises(ConfigError) as e:
        load_checked(path)
    assert e.value.exit_code == 2
    assert any(key in issue for issue in e.value.issues), e.value.issues


@pytest.mark.parametrize("case", VALID, ids=[c[0] for c in VALID])
def test_valid_mutation_loads(case, tmp_path):
    _, name, mutate = case
    load_checked(_apply(name, mutate, tmp_path))


def test_problems_reported_in_two_rounds_pure_checks_before_terratorch(tmp_path, monkeypatch):
    """The checks that need no TerraTorch run first and, if any fails, are all reported without the registry
    checks (so most mistakes exit before the 12-36 s TerraTorch import); once they pass, every registry
    problem is reported at once."""
    import trainer.train.validate as validate

    raw = _raw("demo")
    _set(raw, "model.backbone_kwargs.img_sz", 64)          # registry check
    _set(raw, "model.decoder_kwargs.chanels", [8])         # registry check
    _set(raw, "optim.lr", float("inf"))                    # pydantic
    _set(raw, "checkpoint.resume", str(tmp_path / "gone"))  # filesystem
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))

    def no_registry(*a, **k):
        raise AssertionError("registry checks ran although pure checks had already failed")

    with monkeypatch.context() as m:
        m.setattr(validate, "check_model", no_registry)
        with pytest.raises(ConfigError) as e:
            load_checked(path, ["run.max_steps=1.0e30"])
    keys = ["optim.lr", "checkpoint.resume", "run.max_steps"]
    assert len(e.value.issues) == 3 and all(any(k in i for i in e.value.issues) for k in keys), e.value.issues

    _set(raw, "optim.lr", 1e-3)
    _set(raw, "checkpoint.resume", "auto")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_checked(path)
    keys = ["model.backbone_kwargs.img_sz", "model.decoder_kwargs.chanels"]
    assert len(e.value.issues) == 2 and all(any(k in i for i in e.value.issues) for k in keys), e.value.issues
    assert "did you mean 'model.backbone_kwargs.img_size'?" in str(e.value)


@pytest.mark.parametrize("overrides, wanted", [
    (["memory.profile=zero3_nvme"], ["offload_param.nvme_path", "offload_optimizer.nvme_path"]),
    (["memory.profile=zero3_offload", "memory.optimizer=adamw_8bit"], ["memory.optimizer"]),
])
def test_deepspeed_refusals_are_in_the_first_round(overrides, wanted, monkeypatch):
    """What the run's DeepSpeed set-up would refuse (its JSON rendered, `check_deepspeed`) is found with the pure
    checks, before the TerraTorch import: the registry checks never run for these."""
    import trainer.train.validate as validate

    def no_registry(*a, **k):
        raise AssertionError("registry checks ran although the DeepSpeed config is refused")

    monkeypatch.setattr(validate, "check_model", no_registry)
    with pytest.raises(ConfigError) as e:
        load_checked(SHIPPED["demo"], overrides)
    assert e.value.exit_code == 2 and len(e.value.issues) == len(wanted), e.value.issues
    assert all(any(w in i for i in e.value.issues) for w in wanted), e.value.issues


@pytest.mark.parametrize("overrides", [
    ["memory.profile=zero3_nvme", "memory.nvme_path=/tmp"],
    ["memory.profile=full", "memory.optimizer=adamw_8bit"],   # 8-bit states without DeepSpeed are allowed
    ["memory.profile=auto", "memory.optimizer=adamw_8bit"],   # auto: the planner refuses per candidate later
])
def test_accepted_deepspeed_settings_pass_the_first_round(overrides):
    assert validate_first_round(overrides) == []


def validate_first_round(overrides: list[str]) -> list[str]:
    from trainer.config import load_experiment
    from trainer.train.validate import deepspeed_problems

    return deepspeed_problems(load_experiment(SHIPPED["demo"], overrides))
