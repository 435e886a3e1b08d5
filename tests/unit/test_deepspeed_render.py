import dataclasses
import json

import pytest

from trainer.errors import ConfigError
from trainer.memory import deepspeed as ds
from trainer.memory.profiles import PROFILES

FACTS = ds.DSFacts(micro_batch=4, grad_accum=2, world_size=2, grad_clip=1.0, precision="bf16", lr=1e-3,
                   weight_decay=0.01, betas=(0.9, 0.999), warmup_steps=5, total_steps=100)


@pytest.mark.parametrize("name", ds.preset_names())
def test_every_preset_renders_and_validates(name):
    raw, _ = ds.load_json(name)
    cfg = ds.render(raw, dataclasses.replace(FACTS, nvme_path="/tmp/nvme"), source=name)
    assert cfg["train_batch_size"] == 16
    assert cfg["bf16"]["enabled"] is True
    assert ds._find_auto(cfg) == []


def test_presets_discovered():
    assert len(ds.preset_names()) >= 5


def test_stage_is_read_from_json_not_the_name(tmp_path):
    p = tmp_path / "zero3_but_really_2.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw, _ = ds.load_json(str(p))
    assert ds.zero_stage(ds.render(raw, FACTS)) == 2


def test_user_json_conflicts_name_both_values(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
                             "bf16": {"enabled": False}, "zero_optimization": {"stage": 3},
                             "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": "auto"}}}))
    raw, path = ds.load_json(str(p))
    with pytest.raises(ConfigError) as e:
        ds.render(raw, FACTS, source=str(path))
    text = "\n".join(e.value.issues)
    assert "train_micro_batch_size_per_gpu is 16 but the experiment gives 4" in text and "data.batch_size" in text
    assert "bf16.enabled is False but the experiment gives True" in text and "run.precision" in text
    assert "optimizer.params.lr is 5e-05 but the experiment gives 0.001" in text
    assert len(e.value.issues) == 3
    assert str(p) in text


def test_user_json_hf_style_autos_are_filled(tmp_path):
    p = tmp_path / "hf.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                             "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
                             "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto",
                                                                        "eps": 1e-8, "weight_decay": "auto"}},
                             "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto",
                                           "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                           "total_num_steps": "auto"}},
                             "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    raw, _ = ds.load_json(str(p))
    cfg = ds.render(raw, FACTS)
    assert cfg["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100
    assert cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] > 0


def test_deepspeed_own_parser_rejects_unknown_keys(tmp_path):
    p = tmp_path / "typo.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_parm": {"device": "cpu"}}}))
    raw, _ = ds.load_json(str(p))
    with pytest.raises(ConfigError, match="offload_parm"):
        ds.render(raw, FACTS, source=str(p))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="zero3_bf16_offload_all"):
        ds.resolve_path("zero9")


@pytest.mark.parametrize("preset, device", [("zero3_bf16_offload_all", "cpu"), ("zero3_bf16_nvme", "nvme")])
def test_offloaded_optimizer_allows_torch_fused_adam(preset, device):
    """Offloaded to CPU or to NVMe, the states step with torch's fused AdamW: without the flag Accelerate swaps it
    for DeepSpeedCPUAdam (a JIT compile) and DeepSpeed refuses it."""
    raw, _ = ds.load_json(preset)
    cfg = ds.render(raw, dataclasses.replace(FACTS, nvme_path="/tmp/nvme"))
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert ds.offloads(cfg) == {"param": device, "optimizer": device}


def test_a_json_with_its_own_optimizer_keeps_deepspeeds_choice():
    raw, _ = ds.load_json("zero3_bf16_nvme")
    raw["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    cfg = ds.render(raw, dataclasses.replace(FACTS, nvme_path="/tmp/nvme"))
    assert "zero_force_ds_cpu_optimizer" not in cfg


@pytest.mark.parametrize("name", [n for n, p in PROFILES.items() if p.deepspeed])
def test_profile_presets_exist(name):
    assert ds.resolve_path(PROFILES[name].deepspeed).is_file()


def test_nvme_preset_without_path_names_the_key():
    raw, _ = ds.load_json("zero3_bf16_nvme")
    with pytest.raises(ConfigError, match="memory.nvme_path"):
        ds.render(raw, FACTS)


def test_readme_profile_table_is_generated(root):
    from trainer.memory.profiles import markdown_table

    readme = (root / "README.md").read_text()
    assert markdown_table() in readme, "README profile table is stale: paste markdown_table() output"


def test_cpu_runs_never_build_deepspeeds_shm_comm_op(monkeypatch):
    """`runtime.skip_cpu_shm_comm` (called by `job.make_accelerator` for a CPU DeepSpeed run): DeepSpeed's
    communication backend then neither compiles nor loads its shared-memory all-reduce op."""
    import importlib

    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    from trainer.runtime import skip_cpu_shm_comm

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm",
                        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"])
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    built = []
    monkeypatch.setattr(ShareMemCommBuilder, "load", lambda self, verbose=True: built.append(self.name) or self)
    assert ds_torch.build_shm_op() is not None and built  # what DeepSpeed does on this CPU by itself
    built.clear()
    skip_cpu_shm_comm()
    assert ds_torch.build_shm_op() is None and not built
