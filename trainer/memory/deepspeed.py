"""Render a DeepSpeed JSON (a shipped preset or the user's own) for one experiment.

Presets live in `ds_configs/` and say "auto" for everything the launcher knows (batch sizes, accumulation,
clipping, precision, bucket sizes). A user's JSON is taken as-is: its "auto" values are filled the same way,
its concrete values must agree with the experiment (else an error naming both values and the fix), the ZeRO
stage is read from the JSON, and the result is validated by DeepSpeed's own config parser.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.config import Experiment
    from trainer.memory.profiles import Profile

PRESET_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# DeepSpeed's own defaults, used for "auto" bucket sizes when the model's hidden size is unknown.
_DEFAULT_BUCKET = 50_000_000
_DEFAULT_PERSISTENCE = 100_000


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def resolve_path(name_or_path: str) -> Path:
    """A preset name (`zero3_bf16_offload_all`) or a path to a JSON file."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return p
    preset = PRESET_DIR / f"{p.stem if p.suffix == '.json' else name_or_path}.json"
    if preset.is_file():
        return preset
    raise ConfigError(
        [f"memory.deepspeed: {name_or_path!r} is neither a JSON file nor a preset; "
         f"presets: {', '.join(preset_names())}"])


def load_json(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = resolve_path(name_or_path)
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as e:
        raise ConfigError([f"memory.deepspeed: {path} is not valid JSON ({e})"]) from e


@dataclass(frozen=True)
class DSFacts:
    """What the launcher knows that a DeepSpeed JSON may leave as "auto"."""

    micro_batch: int
    grad_accum: int
    world_size: int
    grad_clip: float | None
    precision: str  # fp32 | bf16 | fp16
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_steps: int
    total_steps: int
    hidden_size: int | None = None
    nvme_path: str | None = None


def facts_for(exp: Experiment, precision: str, world_size: int, total_steps: int,
              nvme_path: str | None = None) -> DSFacts:
    """What `exp` tells a DeepSpeed JSON, for a run of `world_size` processes and `total_steps` optimizer steps in
    `precision`. `nvme_path`: where the JSON's "auto" NVMe path points instead of memory.nvme_path (the planner,
    which never swaps, renders with a placeholder when it is unset)."""
    return DSFacts(micro_batch=exp.data.batch_size, grad_accum=exp.run.grad_accum, world_size=world_size,
                   grad_clip=exp.run.grad_clip, precision=precision, lr=exp.optim.lr,
                   weight_decay=exp.optim.weight_decay, betas=tuple(exp.optim.betas),
                   warmup_steps=exp.scheduler.warmup_steps, total_steps=total_steps,
                   nvme_path=nvme_path or exp.memory.nvme_path)


def config_for(exp: Experiment, profile: Profile, precision: str, world_size: int, total_steps: int,
               nvme_path: str | None = None) -> dict[str, Any] | None:
    """The profile's DeepSpeed JSON rendered for `exp` (`facts_for`), or None for a profile without DeepSpeed: the
    config the run hands to Accelerate (trainer.train.job) and the planner reads its ZeRO settings from."""
    if profile.deepspeed is None:
        return None
    raw, path = load_json(profile.deepspeed)
    return render(raw, facts_for(exp, precision, world_size, total_steps, nvme_path), source=str(path))


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads(cfg: dict[str, Any]) -> dict[str, str]:
    """{"param": "cpu"|"nvme", "optimizer": ...} for the offloads the JSON turns on."""
    z = cfg.get("zero_optimization", {})
    out = {}
    for what in ("param", "optimizer"):
        dev = (z.get(f"offload_{what}") or {}).get("device", "none")
        if dev not in (None, "none"):
            out[what] = dev
    return out


def _fill(node: dict, key: str, value: Any, label: str, source: str, conflicts: list[str], fix: str) -> None:
    """Fill "auto"/absent, or check that a concrete value agrees with the experiment."""
    have = node.get(key, "auto")
    if have == "auto":
        node[key] = value
    elif have != value:
        conflicts.append(f"{source}: {label} is {have!r} but the experiment gives {value!r}; {fix}")


def render(raw: dict[str, Any], facts: DSFacts, source: str = "DeepSpeed config") -> dict[str, Any]:
    """Fill every "auto" from `facts`; collect every disagreement and raise them at once."""
    cfg = copy.deepcopy(raw)
    conflicts: list[str] = []
    auto_fix = "set it to \"auto\" in the JSON, or change the experiment to match"
    _fill(cfg, "train_micro_batch_size_per_gpu", facts.micro_batch, "train_micro_batch_size_per_gpu", source,
          conflicts, f"{auto_fix} (data.batch_size)")
    _fill(cfg, "gradient_accumulation_steps", facts.grad_accum, "gradient_accumulation_steps", source,
          conflicts, f"{auto_fix} (run.grad_accum)")
    _fill(cfg, "train_batch_size", facts.micro_batch * facts.grad_accum * facts.world_size, "train_batch_size",
          source, conflicts, f"{auto_fix} (data.batch_size × run.grad_accum × processes)")
    _fill(cfg, "gradient_clipping", facts.grad_clip if facts.grad_clip is not None else 0.0, "gradient_clipping",
          source, conflicts, f"{auto_fix} (run.grad_clip)")

    for dtype in ("bf16", "fp16"):
        section = cfg.get(dtype)
        want = facts.precision == dtype
        if section is None:
            if want:
                cfg[dtype] = {"enabled": True}
            continue
        _fill(section, "enabled", want, f"{dtype}.enabled", source, conflicts, f"{auto_fix} (run.precision)")

    z = cfg.setdefault("zero_optimization", {})
    h = facts.hidden_size
    bucket = h * h if h else _DEFAULT_BUCKET
    for key, value in (("reduce_bucket_size", bucket), ("allgather_bucket_size", bucket),
                       ("stage3_prefetch_bucket_size", int(0.9 * bucket)),
                       ("stage3_param_persistence_threshold", 10 * h if h else _DEFAULT_PERSISTENCE)):
        if z.get(key) == "auto":
            z[key] = value

    for what in ("offload_param", "offload_optimizer"):
        section = z.get(what) or {}
        if section.get("nvme_path") == "auto":
            if facts.nvme_path:
                section["nvme_path"] = facts.nvme_path
            else:
                conflicts.append(f"{source}: zero_optimization.{what}.nvme_path is \"auto\" but memory.nvme_path "
                                 "is not set: give a directory on a fast local NVMe drive")

    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for key, value in (("lr", facts.lr), ("weight_decay", facts.weight_decay), ("betas", list(facts.betas))):
            _fill(params, key, value, f"optimizer.params.{key}", source, conflicts,
                  f"{auto_fix} (optim.{'lr' if key == 'lr' else key})")
    sched = cfg.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        for key, value in (("warmup_num_steps", facts.warmup_steps), ("total_num_steps", facts.total_steps),
                           ("warmup_max_lr", facts.lr), ("warmup_min_lr", 0.0)):
            if params.get(key) == "auto":
                params[key] = value
    # Offloaded optimizer states step on the CPU (swapped in from NVMe first under zero3_nvme). Without an
    # "optimizer" section we pass torch's fused AdamW (as fast as DeepSpeedCPUAdam on CPU, no 60 s JIT compile);
    # DeepSpeed refuses that unless told to, and Accelerate would swap it for DeepSpeedCPUAdam.
    if offloads(cfg).get("optimizer") in ("cpu", "nvme") and opt is None:
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)

    leftover = [k for k in _find_auto(cfg) if not k.endswith("nvme_path")]
    if leftover:
        conflicts.append(f"{source}: these values are \"auto\" but terrascale cannot fill them: "
                         f"{', '.join(leftover)}; give concrete values")
    if conflicts:
        raise ConfigError(conflicts, source=source)
    validate(cfg, source)
    return cfg


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def validate(cfg: dict[str, Any], source: str) -> None:
    """Parse with DeepSpeed's own config classes: unknown keys and bad values fail here, not mid-run."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    check = copy.deepcopy(cfg)
    # Outside a process group DeepSpeed assumes world size 1; the batch product is checked again at engine start.
    check.pop("train_batch_size", None)
    try:
        DeepSpeedConfig(check)
    except ValidationError as e:
        issues = [f"{source}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(issues, source=source) from e
    except (ValueError, AssertionError) as e:
        raise ConfigError([f"{source}: DeepSpeed rejects this config: {e}"], source=source) from e


def nvme_problem(cfg: dict[str, Any]) -> str | None:
    """Why NVMe offload cannot run on this machine, or None. DeepSpeed's async_io op needs libaio."""
    if "nvme" not in offloads(cfg).values():
        return None
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return ("memory.profile uses NVMe offload, but DeepSpeed's async_io op cannot be built here: install libaio "
            "(`apt-get install libaio-dev`, which launch/setup.sh does when run as root) or pick zero3_offload")
