"""The planner's arithmetic, its tracer, the `auto` choice and the `plan` entry point (fast: no TerraTorch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from trainer.errors import PlanError
from trainer.memory import states as st
from trainer.plan import planner
from trainer.plan.plan_report import SCHEMA, to_json
from trainer.plan.planner import GiB

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- NF4 ------------------------------------------------------------------------------------------------
def _bnb_bytes(weight) -> int:
    """Every tensor bitsandbytes keeps for one NF4 weight: packed data and the whole quantization state."""
    qs = weight.quant_state
    tensors = [weight.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("shape", [(64, 96), (384, 96), (100, 37), (7, 5), (1000, 1000)])
def test_nf4_bytes_equal_bitsandbytes_quantized_tensors(shape):
    import bitsandbytes as bnb

    lin = nn.Linear(shape[1], shape[0])
    weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, compress_statistics=True,
                               quant_type="nf4", quant_storage=torch.uint8).to("cpu")  # as trainer.model.fitting does
    assert st.nf4_bytes(shape[0] * shape[1]) == _bnb_bytes(weight)


def test_nf4_total_counts_each_tensor():
    assert st.nf4_total({"6144": 2, "100": 1}) == 2 * st.nf4_bytes(6144) + st.nf4_bytes(100)
    # half a byte per weight plus ~1/64 byte of quantized absmax per weight
    assert 0.5 < st.nf4_bytes(10**8) / 10**8 < 0.52


# --- model states ---------------------------------------------------------------------------------------
def _counts(backbone=1_000_000, head=10_000, lora=0, trainable=None, largest=50_000, linear=800_000):
    return st.Counts(backbone=backbone, head=head, lora=lora, linear_weights=linear,
                     linear_numels={str(linear // 4): 4}, linear_biases=1000, largest_linear=linear // 4,
                     largest_layer=largest, persistent=3000,
                     trainable=backbone + head + lora if trainable is None else trainable)


def test_accelerate_full_keeps_fp32_weights_grads_and_two_adam_moments():
    c = _counts()
    s = st.accelerate_states(c, compute_bytes=2, nf4=False)
    assert (s.gpu_params, s.gpu_grads, s.gpu_optimizer) == (4 * c.all, 4 * c.all, 8 * c.all)
    assert s.cpu == 0 and s.h2d_bytes == 0


def test_accelerate_qlora_stores_linears_in_nf4_and_trains_adapters_and_head_only():
    c = _counts(lora=5000, trainable=10_000 + 5000)
    s = st.accelerate_states(c, compute_bytes=2, nf4=True)
    other = c.backbone - c.linear_weights  # norms, embeddings, biases: frozen in the compute dtype
    assert s.gpu_params == st.nf4_total(c.linear_numels) + 2 * other + 4 * (c.head + c.lora)
    assert (s.gpu_grads, s.gpu_optimizer) == (4 * c.trainable, 8 * c.trainable)


def test_accelerate_lora_holds_the_frozen_backbone_in_the_compute_dtype_and_trainables_in_fp32():
    c = _counts(lora=5000, trainable=10_000 + 5000)
    assert st.accelerate_states(c, compute_bytes=2, nf4=False).gpu_params == 2 * c.backbone + 4 * (c.head + c.lora)
    assert st.accelerate_states(c, compute_bytes=4, nf4=False).gpu_params == 4 * c.all  # a CPU run stays fp32


def test_optimizer_state_bytes_follow_bitsandbytes_8bit_layout():
    import bitsandbytes as bnb

    p = nn.Parameter(torch.randn(300, 100))  # 30000 elements: 8-bit states (>= min_8bit_size)
    opt = bnb.optim.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    held = sum(state[k].untyped_storage().nbytes() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert st.optimizer_state_bytes("adamw_8bit", p.numel()) == held
    assert st.optimizer_state_bytes("paged_adamw_8bit", p.numel()) == held
    assert st.optimizer_state_bytes("adamw", 1000) == 8000 and st.optimizer_state_bytes("sgd", 1000) == 4000


def _zero(stage, param=None, optimizer=None):
    return st.ZeroSettings(stage=stage, offload_param=param, offload_optimizer=optimizer, reduce_bucket=1000,
                           prefetch_bucket=900, persistence_threshold=100, overlap_comm=True, nvme_swap=10_000)


@pytest.mark.parametrize("param,optimizer", [(None, None), (None, "cpu"), ("cpu", "cpu")])
def test_zero3_terms_add_up_to_deepspeeds_own_estimate(param, optimizer):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    c = _counts()
    s = st.zero_states(c, 2, _zero(3, param, optimizer), micro_steps=1)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(c.all, c.largest_layer, 1, 1, cpu_offload=optimizer is not None,
                                                        cpu_offload_params=param is not None, zero_init=False)
    gathered = 4 * c.largest_layer  # DeepSpeed's largest-layer term, shown with the temporaries
    persistent_on_gpu = 2 * c.persistent if param else 0  # ours: small params stay on the GPU
    assert s.gpu_params + s.gpu_grads + s.gpu_optimizer + gathered == gpu + persistent_on_gpu
    assert s.gpu_buffers == gathered + 2 * (1000 + 900)
    assert s.cpu == (cpu if (param or optimizer) else 0)


def test_zero2_terms_add_up_to_deepspeeds_own_estimate():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    c = _counts()
    s = st.zero_states(c, 2, _zero(2), micro_steps=1)
    _, gpu = estimate_zero2_model_states_mem_needs(c.all, 1, 1, cpu_offload=False)
    assert s.gpu_params + s.gpu_grads + s.gpu_optimizer == gpu == 20 * c.all


def test_zero3_frozen_parameters_cost_only_their_16_bit_copy_on_cpu():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    c = _counts(lora=5000, trainable=15_000)
    s = st.zero_states(c, 2, _zero(3, "cpu", "cpu"), micro_steps=1)
    cpu_trainable, _, _ = estimate_zero3_model_states_mem_needs(15_000, c.largest_layer, 1, 1, True, True, False)
    assert s.cpu == cpu_trainable + int(2 * (c.all - 15_000) * st.DS_CPU_BUFFER_FACTOR)


def test_offload_traffic_per_optimizer_step():
    c = _counts()
    opt_only = st.zero_states(c, 2, _zero(3, None, "cpu"), micro_steps=4)
    assert (opt_only.h2d_bytes, opt_only.d2h_bytes) == (2 * c.all, 2 * c.all)  # grads out, params back: once
    streamed = st.zero_states(c, 2, _zero(3, "cpu", "cpu"), micro_steps=4)
    assert streamed.h2d_bytes == 4 * 2 * 2 * c.all  # every micro-step fetches each parameter twice
    nvme = st.zero_states(c, 2, _zero(3, "nvme", "nvme"), micro_steps=1)
    assert nvme.nvme == 2 * c.all + 12 * c.all and nvme.nvme_read > 0


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_the_planner_counts_the_configured_optimizers_states(optimizer):
    from trainer.config import build_experiment

    exp = build_experiment({"memory": {"profile": "qlora", "optimizer": optimizer}}, source="t")
    c = _counts(lora=5000, trainable=15_000)
    s = planner._states(c, planner.profile_for(exp, "qlora"), None, 2, exp)
    assert s.gpu_optimizer == st.optimizer_state_bytes(optimizer, 15_000)


def test_dequantization_buffer_is_one_copy_in_the_quantization_dtype():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = bnb.nn.Params4bit(torch.randn(64, 96).bfloat16(), requires_grad=False, quant_type="nf4").to("cpu")
    out = F.dequantize_4bit(w.data, w.quant_state)  # what the 4-bit matmul materialises per call
    assert out.dtype == torch.bfloat16 and st.dequant_buffer(64 * 96, 2) == out.untyped_storage().nbytes()
    assert st.dequant_buffer(1000, 4) == 4000


# --- extrapolation ---------------------------------------------------------------------------------------
def test_depth_extrapolation_is_linear_per_stack():
    from trainer.plan.workload import _lerp

    base = {"peak": {"activations": 100}, "flops": 10, "outputs": [[1, 2], "bfloat16"]}
    vision4 = {"peak": {"activations": 140}, "flops": 14, "outputs": []}
    text4 = {"peak": {"activations": 110}, "flops": 30, "outputs": []}
    out = _lerp(base, {"vision": (vision4, 2, 4, 10), "text": (text4, 2, 4, 6)})
    assert out["peak"]["activations"] == 100 + 8 * 20 + 4 * 5
    assert out["flops"] == 10 + 8 * 2 + 4 * 10
    assert out["outputs"] == base["outputs"]


# --- the tracer ------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64))


def test_fake_trace_equals_real_tensors_and_virtual_grads_equal_kept_grads():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.plan.trace import meta_to_fake_, trace_step

    real = trace_step(_mlp(), lambda: (torch.randn(32, 64),), count_flops=False)
    with torch.device("meta"):
        model = _mlp()
    fake = FakeTensorMode()
    with fake:
        meta_to_fake_(model)
    traced = trace_step(model, lambda: (torch.randn(32, 64),), fake_mode=fake, count_flops=False)
    assert traced.peak_with_grads["total"] == real.peak["total"]
    assert traced.peak_with_grads["grads"] == real.peak["grads"] > 0
    assert traced.peak["grads"] == 0  # freed as DeepSpeed frees them
    assert traced.peak["total"] < traced.peak_with_grads["total"]


def test_tracker_accepts_frozen_parameters():
    from trainer.plan.trace import trace_step

    model = _mlp()
    model[0].requires_grad_(False)
    t = trace_step(model, lambda: (torch.randn(8, 64),), count_flops=False)  # the stock tracker raises here
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    assert t.peak["params"] == sum(p.numel() * 4 for p in model.parameters())


def test_flop_counter_matches_torch_and_counts_cpu_flash_attention():
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.plan.trace import FlopCounter

    model, x = _mlp(), torch.randn(32, 64)
    with FlopCounterMode(display=False) as ref:
        model(x).sum().backward()
    with FlopCounter() as ours:
        model(x).sum().backward()
    assert ours.total == ref.get_total_flops() > 0
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with FlopCounter() as attn:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    b, h, s, d = 1, 2, 16, 8
    # torch's formulas for the GPU flash kernel: forward QK^T and AV (4·bhs²d), backward 10·bhs²d
    assert attn.total == 14 * b * h * s * s * d


def test_small_tensor_twins_let_value_dependent_index_code_run_under_checkpointing():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.checkpoint import checkpoint

    from trainer.plan.trace import SmallTensorTwins

    fake = FakeTensorMode()
    seen = []

    def block(x, grid):
        lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])  # Qwen2-VL's cu_seqlens
        seen.append(lengths.tolist())
        return x * x

    with fake, SmallTensorTwins(fake):
        grid = torch.tensor([[1, 2, 3], [2, 1, 1]])
        x = torch.randn(8, 4, requires_grad=True)
        checkpoint(block, x, grid, use_reentrant=False).sum().backward()
    assert seen == [[6, 1, 1], [6, 1, 1]]  # forward and the recomputation in backward


# --- the choice ------------------------------------------------------------------------------------------
def _est(name, gpu, cpu=1 * GiB, fits=None, margin=None, refused=None):
    e = planner.Estimate(name, "bf16", gpu=dict(params=gpu, grads=0, optimizer=0, activations=0, temporaries=0,
                                                 allowance=0, total=gpu),
                         cpu=dict(load_peak=cpu, training=0, total=cpu), refused=refused)
    budget = planner.Budget(24 * GiB, 64 * GiB)
    if refused:
        e.why_not.append(refused)
    else:
        planner._judge(e, budget)
    return e


def _plan(gpus: dict[str, float]) -> planner.Plan:
    from trainer.plan.workload import InputShape

    ests = {n: _est(n, int(g * GiB)) for n, g in gpus.items()}
    return planner.Plan("internvl2_40b", "full", InputShape(1, 6, 448, 448), planner.Budget(24 * GiB, 64 * GiB),
                        {"backbone": 39_000_000_000, "head": 1_000_000}, ests, planner.METHOD, 1.0)


ALL_FIT = {n: 10.0 for n in planner.SPEED_ORDER}


def test_auto_takes_the_first_profile_in_speed_order_that_fits_with_margin():
    assert planner.pick(_plan(ALL_FIT))[0] == "full"
    gpus = {**ALL_FIT, "full": 30, "zero2": 40, "lora": 22.5}  # lora fits, but not with a 10 % margin
    plan = _plan(gpus)
    name, reason = planner.pick(plan)
    assert name == "zero3" and reason.startswith("zero3, the fastest profile that fits with 10% to spare")
    assert plan.estimates["lora"].fits and not plan.estimates["lora"].fits_with_margin
    assert "  lora: " not in plan.table() and "lora" in plan.table()


def test_speed_order_puts_the_offload_profiles_last_and_covers_every_profile():
    order = planner.SPEED_ORDER
    from trainer.memory.profiles import PROFILES

    assert set(order) == set(PROFILES) - {"auto"}
    assert order.index("qlora") < order.index("zero3_offload_optimizer") < order.index("zero3_offload")
    assert order[-1] == "zero3_nvme"


def test_no_fit_raises_plan_error_carrying_the_table(monkeypatch):
    plan = _plan({n: 100.0 for n in planner.SPEED_ORDER})
    monkeypatch.setattr(planner, "plan_experiment", lambda *a, **k: plan)
    with pytest.raises(PlanError) as err:
        planner.choose_profile(object(), 24 * GiB, 64 * GiB)
    text = str(err.value)
    assert "no memory profile fits internvl2_40b" in text
    assert plan.table() in text and "  zero3_offload_lora: GPU 100.0 GiB > 24.0 GiB" in text
    assert err.value.exit_code == 2


def test_refused_combinations_are_never_chosen():
    gpus = dict(ALL_FIT)
    plan = _plan(gpus)
    plan.estimates["full"] = _est("full", 1, refused="refused: 4-bit + offload_param")
    assert planner.pick(plan)[0] == "zero2"


def test_json_schema():
    doc = to_json(_plan(ALL_FIT))
    assert doc["schema"] == SCHEMA
    assert set(doc) >= {"backbone", "mode", "input", "budget", "counts", "profiles", "auto", "assumptions", "method"}
    assert [p["profile"] for p in doc["profiles"]] == list(planner.SPEED_ORDER)
    for p in doc["profiles"]:
        assert set(p["gpu_bytes"]) == {"params", "grads", "optimizer", "activations", "temporaries", "allowance",
                                       "total"}
        assert set(p["cpu_bytes"]) == {"load_peak", "training", "total"}
        assert set(p["step_time_s"]) == {"compute", "pcie", "nvme", "lower_bound"}
        assert isinstance(p["fits"], bool) and isinstance(p["why_not"], list)
    assert doc["auto"]["profile"] == "full"
    assert doc["assumptions"]["gpu_bf16_flops"] == 165.2e12 and doc["assumptions"]["pcie_bytes_per_s"] == 25e9
    json.dumps(doc)


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GiB), ("64 GB", 64 * 10**9), ("128G", 128 * GiB),
                                           ("1.5GiB", int(1.5 * GiB)), ("1000", 1000)])
def test_parse_size(text, expected):
    assert planner.parse_size(text) == expected


def test_parse_size_names_the_option():
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="--gpu-memory: '24 bananas' is not a size"):
        planner.parse_size("24 bananas", "--gpu-memory")


# --- the entry point -------------------------------------------------------------------------------------
def _run_plan(tmp_path, config: str, *args: str) -> tuple[subprocess.CompletedProcess, float, dict]:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, sys, json\n"
        f"sys.argv = ['launch/plan.py', *{list(args)!r}]\n"
        "code = 0\n"
        "try:\n    runpy.run_path('launch/plan.py', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "sys.stderr.write('MODULES ' + json.dumps({m: m in sys.modules for m in ('terratorch', 'accelerate', 'peft')})"
        " + '\\n')\n"
        "sys.exit(code)\n")
    env = {**os.environ, "TERRASCALE_CACHE": str(tmp_path / "cache")}  # a fresh user cache: only the shipped seed
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(probe)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    seconds = time.perf_counter() - t0
    modules = json.loads(proc.stderr.rsplit("MODULES ", 1)[1])
    return proc, seconds, modules


def test_plan_answers_for_40b_in_under_a_minute_without_terratorch(tmp_path):
    import yaml

    from trainer.plan.fit_table import representative

    cfg = tmp_path / "internvl2_40b.yaml"
    cfg.write_text(yaml.safe_dump(representative("internvl2_40b", "full").model_dump(mode="json")))
    proc, seconds, modules = _run_plan(tmp_path, str(cfg), "--config", str(cfg), "--gpu-memory", "24GiB",
                                       "--cpu-memory", "128GiB", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["schema"] == SCHEMA and doc["backbone"] == "internvl2_40b" and doc["counts"]["backbone"] > 38e9
    assert doc["measured_now"] == [], "the shipped seed should answer this experiment without measuring"
    # transformers' model classes import accelerate themselves when it is installed; the costly imports the
    # fast path must avoid are TerraTorch (11-17 s) and peft.
    assert modules["terratorch"] is False and modules["peft"] is False, modules
    assert seconds < 60, f"plan took {seconds:.0f} s"
    by_name = {p["profile"]: p for p in doc["profiles"]}
    assert by_name["zero3_offload_lora"]["gpu_bytes"]["total"] < 24 * GiB


def test_plan_config_error_exits_2_with_the_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  backbone: internvl2_40b\n  decodr: UNetDecoder\n")
    proc, _, _ = _run_plan(tmp_path, str(cfg), "--config", str(cfg))
    assert proc.returncode == 2
    assert "model.decodr: unknown key; did you mean 'model.decoder'?" in proc.stderr


# --- change detection: T dates -----------------------------------------------------------------------
def test_change_detection_plans_every_date_through_the_shared_encoder():
    from trainer.config import build_experiment
    from trainer.plan import workload as wl
    from trainer.plan.measure import Measurer

    def exp(task: dict):
        return build_experiment({"model": {"backbone": "earthmind_4b", "backbone_kwargs": {"in_channels": 6}},
                                 "task": task, "data": {"batch_size": 2, "synthetic": {"tile_size": 32}}}, source="t")

    single = wl.input_shape(exp({"name": "segmentation"}))
    assert single.tensor() == (2, 6, 32, 32) and "dates" not in single.key()  # keys of the shipped seed hold
    change = exp({"name": "change_detection", "num_dates": 3, "fusion": "concat"})
    shape = wl.input_shape(change)
    assert shape.tensor() == (2, 3, 6, 32, 32) and shape.key()["dates"] == 3
    assert shape.per_date().tensor() == (6, 6, 32, 32)  # the encoder sees B x T images
    feature = [[6, 64, 8, 8], "bfloat16"]  # what the encoder trace returns at B x T
    # the decoder sees B samples: concat stacks the dates' channels, diff keeps one date's
    assert Measurer(change, shape, None)._fused(feature, [64, 64]) == ([[2, 192, 8, 8], "bfloat16"], [192, 192])
    diff = exp({"name": "change_detection", "num_dates": 3})
    assert Measurer(diff, wl.input_shape(diff), None)._fused(feature, [64, 64]) == ([[2, 64, 8, 8], "bfloat16"],
                                                                                   [64, 64])


def test_a_step_that_cannot_run_is_cached_like_a_result(tmp_path, monkeypatch):
    from trainer.plan import plan_cache
    monkeypatch.setenv("TERRASCALE_CACHE", str(tmp_path))
    spec = {"kind": "test", "what": "a failing trace"}

    def fails():
        raise RuntimeError("Input type (BFloat16) and bias type (float) should be the same\nmore lines")

    with pytest.raises(RuntimeError, match=r"Input type \(BFloat16\)"):
        plan_cache.cached(spec, fails)
    # the next plan raises the same error without computing again (no model build, no TerraTorch import)
    with pytest.raises(RuntimeError, match=r"Input type \(BFloat16\) and bias type \(float\) should be the same"):
        plan_cache.cached(spec, lambda: pytest.fail("recomputed a cached failure"))
    # other errors are bugs, not answers: they propagate and are not stored
    other = {"kind": "test", "what": "a bug"}
    with pytest.raises(KeyError):
        plan_cache.cached(other, lambda: {}["missing"])
    assert plan_cache.get(plan_cache.key_of(other)) is None
