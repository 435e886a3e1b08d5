"""The planner and the run apply the same rules, each from one function: the profile and its precision
(`trainer.memory.profiles.profile_for` / `precision_for`), the rendered DeepSpeed config
(`trainer.memory.deepspeed.config_for`) and the combination checks on it (`profiles.check_deepspeed`), the world size
(`trainer.runtime.world_size`), the export metadata (`trainer.train.export.export_metadata`).

Checked by behaviour (the planner's estimate and the run's set-up steps agree on a few experiments) and by reading
trainer/'s source: a second home of a rule would be a second call to the building blocks these functions wrap."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

from trainer.config import Experiment, TerraTorchSpec, load_experiment
from trainer.errors import ConfigError
from trainer.memory import deepspeed as ds
from trainer.memory import profiles as P
from trainer.memory import states as st
from trainer.plan import planner
from trainer.plan.assumptions import SPEED_ORDER
from trainer.plan.head import Builders
from trainer.plan.workload import InputShape
from trainer.train import run

TRAINER = Path(__file__).resolve().parents[2] / "trainer"

EXPERIMENTS = [
    [],
    ["run.precision=fp32"],
    ["run.precision=fp16", "run.grad_accum=4", "data.batch_size=3", "run.grad_clip=0.5", "optim.lr=0.01"],
    ["memory.quantization=nf4"],  # refused without LoRA, and with ZeRO-3 parameter offload
    ["memory.lora.rank=4", "memory.grad_checkpointing=false", "scheduler.warmup_steps=7", "run.max_steps=33"],
    ["memory.optimizer=adamw_8bit"],  # refused under every DeepSpeed profile (the run's optimizer build)
]


def _exp(overrides: list[str], tmp_path) -> Experiment:
    return load_experiment(None, [*overrides, f"memory.nvme_path={tmp_path}"])


def _run_deepspeed(exp, profile, precision, monkeypatch):
    """(rendered config, ZeRO stage, refusal) as trainer.train.run.setup gets them for one process."""
    monkeypatch.setattr(ds, "nvme_problem", lambda cfg: None)  # libaio is this machine's question, not the rule's
    try:
        cfg, stage = run._deepspeed(exp, profile, precision, 1, exp.run.max_steps, universal=False)
    except ConfigError as e:
        return None, None, "; ".join(e.issues)
    return cfg, stage, None


@pytest.mark.parametrize("overrides", EXPERIMENTS, ids=lambda o: " ".join(o) or "defaults")
def test_the_planner_reads_the_zero_settings_and_refusals_of_the_config_the_run_renders(overrides, tmp_path,
                                                                                         monkeypatch):
    exp = _exp(overrides, tmp_path)
    read = []  # the config the planner reads its ZeRO settings from
    zero_settings = st.zero_settings
    monkeypatch.setattr(st, "zero_settings", lambda cfg: read.append(cfg) or zero_settings(cfg))
    for name in SPEED_ORDER:
        profile = P.profile_for(exp, name)
        precision = P.precision_for(exp, profile, on_gpu=True)
        read.clear()
        zero, refusal = planner._zero(exp, profile, precision)
        cfg, stage, run_refusal = _run_deepspeed(exp, profile, precision, monkeypatch)
        assert refusal == run_refusal, name
        if refusal is None:
            assert read == ([cfg] if cfg is not None else []), name  # every value: batch, clipping, dtype, ...
            assert zero == (zero_settings(cfg) if cfg is not None else None), name
            assert stage == (zero.stage if zero else 0), name
    if overrides == ["memory.quantization=nf4"]:  # the rule did refuse something
        assert planner._zero(exp, P.profile_for(exp, "full"), "bf16")[1]
    if overrides == ["memory.optimizer=adamw_8bit"]:
        assert planner._zero(exp, P.profile_for(exp, "zero2"), "bf16")[1].startswith("memory.optimizer: 'adamw_8bit'")
        assert planner._zero(exp, P.profile_for(exp, "lora"), "bf16")[1] is None


def test_the_run_resolves_the_profile_the_planner_plans_under_its_name(tmp_path):
    for overrides in EXPERIMENTS:
        exp = _exp(overrides, tmp_path)
        for name in SPEED_ORDER:
            named = exp.model_copy(update={"memory": exp.memory.model_copy(update={"profile": name})})
            # what auto's choice becomes in the run (memory.deepspeed unset) and what the planner estimated
            assert P.profile_for(named, named.memory.profile) == P.profile_for(exp, name), name
    custom = load_experiment(None, ["memory.profile=zero2", "memory.deepspeed=zero3_bf16"])
    assert P.profile_for(custom, "zero2").deepspeed == "zero3_bf16"  # the experiment's own JSON, its own profile
    assert P.profile_for(custom, "zero3").deepspeed == "zero3_bf16"  # a candidate keeps its preset
    assert P.profile_for(custom, "zero2").deepspeed != P.profile_for(load_experiment(None, []), "zero2").deepspeed


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def _tiny_plan(exp: Experiment, device: str):
    def around(exp, backbone):
        raise AssertionError("a whole model is never split")

    builders = Builders(full_model=lambda exp: _Tiny(), around=around, backbone_path=lambda m: "encoder")
    return planner.plan_experiment(exp, 24 << 30, 64 << 30, builders=builders, shape=InputShape(2, 6, 16, 16),
                                   label="tiny", device=device, profiles=("full", "zero2", "lora"))


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_the_planner_estimates_in_the_precision_the_run_trains_in(precision, tmp_path, monkeypatch):
    monkeypatch.setenv("TERRASCALE_CACHE", str(tmp_path / "cache"))
    spec = TerraTorchSpec(config={"model": {"class_path": "SemanticSegmentationTask", "init_args": {"model_args": {
        "num_classes": 2}}}, "data": {"class_path": "X"}}, source="tt.yaml")
    exp = Experiment(terratorch=spec).model_copy(update={"run": Experiment().run.model_copy(
        update={"precision": precision})})
    for device, on_gpu in (("cuda", True), ("cpu", False)):
        plan = _tiny_plan(exp, device)
        for name, est in plan.estimates.items():
            assert est.precision == P.precision_for(exp, P.profile_for(exp, name), on_gpu=on_gpu), (device, name)
            assert est.precision == (precision if precision != "auto" else "bf16" if on_gpu else "fp32")


# --- one home each, read from the source ---------------------------------------------------------------------
def _calls() -> dict[str, set[str]]:
    """{called name: the trainer modules (paths relative to trainer/) that call it}, `f(...)` and `x.f(...)`."""
    out: dict[str, set[str]] = {}
    for path in TRAINER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name:
                    out.setdefault(name, set()).add(str(path.relative_to(TRAINER)))
    return out


CALLS = _calls()


@pytest.mark.parametrize("block, home", [
    ("DSFacts", {"memory/deepspeed.py"}),              # the facts a DeepSpeed JSON is rendered with
    ("load_json", {"memory/deepspeed.py"}),
    ("check_combination", {"memory/profiles.py"}),     # through check_deepspeed
    ("resolve_profile", {"memory/profiles.py"}),       # through profile_for
    ("no_backbone_problem", {"memory/profiles.py"}),   # through no_backbone_refusal
    ("optimizer_refusal", {"memory/profiles.py"}),     # through check_deepspeed
    ("backbone_name", {"train/export.py", "predict/predict.py"}),
])
def test_each_rule_is_built_in_one_place(block, home):
    assert CALLS.get(block, set()) <= home, f"{block} is called outside {home}: {CALLS[block] - home}"


@pytest.mark.parametrize("rule, callers", [
    ("precision_for", {"train/run.py", "train/terratorch_run.py", "plan/planner.py"}),
    ("config_for", {"train/run.py", "train/terratorch_run.py", "plan/planner.py"}),
    ("check_deepspeed", {"train/run.py", "train/terratorch_run.py", "plan/planner.py"}),
    ("no_backbone_refusal", {"train/terratorch_run.py", "plan/planner.py"}),
    ("missing_backbone", {"train/terratorch_run.py", "plan/terratorch_plan.py"}),
    ("profile_for", {"train/run.py", "train/terratorch_run.py", "plan/planner.py"}),
    ("world_size", {"train/run.py", "train/terratorch_run.py", "plan/auto.py"}),
    ("export_metadata", {"train/run.py", "cli/export.py"}),
    ("deepspeed_bf16", {"train/run.py", "train/terratorch_run.py", "train/job.py"}),  # the model cast, Job.input_dtype
])
def test_the_planner_and_the_run_call_the_same_rule(rule, callers):
    assert callers <= CALLS.get(rule, set())


def test_world_size_is_read_in_one_place_only():
    readers = {str(p.relative_to(TRAINER)) for p in TRAINER.rglob("*.py")
               if 'get("WORLD_SIZE"' in p.read_text() or "['WORLD_SIZE']" in p.read_text()
               or '["WORLD_SIZE"]' in p.read_text()}
    assert readers == {"runtime.py"}


def test_world_size_is_the_launchers(monkeypatch):
    from trainer.runtime import world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert world_size() == 3


def test_export_metadata_names_the_backbone_a_terratorch_file_trains():
    from trainer.train.export import export_metadata

    native = load_experiment(None, ["model.backbone=prithvi_eo_v2_300"])
    assert export_metadata(native, "lora", 7) == {"backbone": "prithvi_eo_v2_300", "step": 7,
                                                  "task": native.task.name, "profile": "lora"}
    spec = TerraTorchSpec(config={"model": {"class_path": "SemanticSegmentationTask", "init_args": {"model_args": {
        "backbone": "terramind_v1_base", "num_classes": 2}}}, "data": {"class_path": "X"}}, source="tt.yaml")
    assert export_metadata(Experiment(terratorch=spec), "full", 3)["backbone"] == "terramind_v1_base"
