"""Every config problem at load, before heavy work: the pure checks (trainer.config) plus those that need
TerraTorch's registries, reported together as one ConfigError (exit 2).

`load_checked(path, overrides)` is what `terrascale train` runs. Beyond the pydantic model it checks:
- model.backbone against BACKBONE_REGISTRY (after terrascale's own `register_all()`), and every
  model.backbone_kwargs key against what the chosen constructor really accepts: terrascale's backbones
  through `factory.accepted_kwargs`, TerraTorch's by reading the constructor's signature and following its
  `**kwargs` into the calls that forward them (`kwargs_of`), down to a closed signature;
- necks and decoder by name (NECK_REGISTRY, DECODER_REGISTRY) and their kwargs the same way, head_kwargs
  against the task's TerraTorch head;
- band names (Prithvi: HLS band names; TerraMind: its pretrained band names), img_size positive and
  divisible by the patch, a checkpoint.resume path that exists and is complete;
- before those (no TerraTorch needed): the named profile's DeepSpeed JSON, rendered and checked as the run will
  (`deepspeed_problems`), so an NVMe profile without memory.nvme_path or 8-bit states under ZeRO exit in seconds.
Cost: the checks take ~0.1 s; importing TerraTorch takes 12-18 s on an idle 2-core machine (33 s measured with
other jobs running). A valid config does not pay it twice: `terrascale train` builds the model in the same
process. Unreadable, empty or non-mapping files are refused before that import.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from trainer.config import Experiment, ModelConfig, TaskKind, experiment_from_raw, load_raw
from trainer.errors import ConfigError
from trainer.model.signatures import Accepted, kwargs_of, positional_names, unknown_keys

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# The checks


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _value(section: dict[str, Any], cls: type, key: str) -> Any:
    if key in section:
        return section[key]
    field = cls.model_fields[key]
    return field.default_factory() if field.default_factory else field.default


def check_model(model: dict[str, Any], kind: TaskKind) -> list[str]:
    """Registry checks of a raw `model:` section (its values may be the wrong type: those are skipped, the
    pydantic model reports them)."""
    from terratorch.registry import BACKBONE_REGISTRY, DECODER_REGISTRY, NECK_REGISTRY

    from trainer.backbones import register_all

    ours = set(register_all())  # terrascale's backbones (and necks) join TerraTorch's registries first
    issues: list[str] = []
    name = _value(model, ModelConfig, "backbone")
    kwargs = _value(model, ModelConfig, "backbone_kwargs")
    if isinstance(name, str) and isinstance(kwargs, dict):
        issues += check_backbone(name, kwargs, ours, BACKBONE_REGISTRY)
    necks = _value(model, ModelConfig, "necks")
    if isinstance(necks, list):
        issues += check_necks(necks, NECK_REGISTRY)
    decoder = _value(model, ModelConfig, "decoder")
    dkw, hkw = _value(model, ModelConfig, "decoder_kwargs"), _value(model, ModelConfig, "head_kwargs")
    if isinstance(decoder, str) and isinstance(dkw, dict) and isinstance(hkw, dict):
        issues += check_decoder_and_head(decoder, dkw, hkw, kind, DECODER_REGISTRY)
    return issues


def _nearest(name: str, names, what: str, key: str) -> str:
    near = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.5)
    return f"{key}: {name!r} is not a registered {what}; " + (
        f"did you mean {' or '.join(repr(n) for n in near)}?" if near else f"registered: {', '.join(sorted(names))}")


def _unchecked(key: str, name: str, why: str) -> None:
    # said, not hidden: the build itself will reject what it does not take
    log.info("%s of %r not checked before the build: %s", key, name, why)


def check_backbone(name: str, kwargs: dict[str, Any], ours: set[str], registry) -> list[str]:
    from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY as own

    from trainer.backbones.factory import accepted_kwargs

    key = "model.backbone_kwargs"
    if name not in registry:
        return [_nearest(name, list(own), "backbone (TerraTorch's or terrascale's)", "model.backbone")]
    if name in ours:
        return unknown_keys(kwargs, set(accepted_kwargs(name)), key, owner=f"terrascale's backbone {name}")
    if registry.find_registry(name) is not own:
        _unchecked(key, name, "its constructor is another library's (timm/smp)")
        return []
    ctor = own[name]
    acc = kwargs_of(ctor)
    issues = unknown_keys(kwargs, acc.names, key, acc.forced, f"TerraTorch's {name}") if acc.closed else []
    if not acc.closed:
        _unchecked(key, name, "its **kwargs lead somewhere that cannot be followed")
    return issues + _bands(name, ctor, kwargs) + _img_size(name, ctor, kwargs, acc)


def _bands(name: str, ctor, kwargs: dict[str, Any]) -> list[str]:
    """Band names against those the pretrained patch embedding knows. TerraTorch takes any other name as a new
    band (random weights), which is how SAR bands reach Prithvi; a name within a typo of a known band
    (`GREN`) is refused, since it silently throws the pretrained weights of `GREEN` away."""
    module, bands = ctor.__module__, kwargs.get("bands")
    if "prithvi" in module and isinstance(bands, list):
        from terratorch.datasets.utils import HLSBands

        valid = {b.value for b in HLSBands}
        given = [("model.backbone_kwargs.bands", b) for b in bands]
    elif "terramind" in module and isinstance(bands, dict):
        valid = {b for v in ctor.__globals__.get("PRETRAINED_BANDS", {}).values() for b in v}
        given = [(f"model.backbone_kwargs.bands.{m}", b) for m, bs in bands.items() if isinstance(bs, list) for b in bs]
        modalities = kwargs.get("modalities")
        if isinstance(modalities, list):  # TerraMind looks each bands key up among the modalities (KeyError)
            names = {m for m in modalities if isinstance(m, str)} | {
                k for m in modalities if isinstance(m, dict) for k in m}
            given_issues = [f"model.backbone_kwargs.bands.{m}: {m!r} is not one of model.backbone_kwargs.modalities "
                            f"{sorted(names)}; key the bands by a modality" for m in bands if m not in names]
            if given_issues:
                return given_issues
    else:
        return []
    issues, new = [], []
    for where, b in given:
        if isinstance(b, str) and b not in valid:
            near = difflib.get_close_matches(b, sorted(valid), n=1, cutoff=0.8)
            if near:
                issues.append(f"{where}: {b!r} is not a band {name} was pretrained on; did you mean {near[0]!r}? (a "
                              "new band gets random patch weights: give it a name unlike the pretrained ones)")
            else:
                new.append(b)
    if new:
        log.info("%s: bands %s are new to the pretrained model (random patch-embedding weights)", name, new)
    return issues


def _img_size(name: str, ctor, kwargs: dict[str, Any], acc: Accepted) -> list[str]:
    if "img_size" not in kwargs:
        return []
    size = kwargs["img_size"]
    dims = list(size) if isinstance(size, (list, tuple)) else [size]
    if not (1 <= len(dims) <= 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        return [f"model.backbone_kwargs.img_size: {size!r} must be a positive int (or [height, width]), e.g. the "
                "tile size 224"]
    cfg = ctor.__globals__.get("prithvi_cfgs", {}).get(name, {})
    patch = kwargs.get("patch_size", cfg.get("patch_size", acc.defaults.get("patch_size")))
    patch = patch[-1] if isinstance(patch, (list, tuple)) and patch else patch
    if isinstance(patch, int) and patch > 0 and any(d % patch for d in dims):
        lo = max(patch, dims[0] // patch * patch)
        return [f"model.backbone_kwargs.img_size: {size!r} is not a multiple of {name}'s patch size {patch}: use "
                f"{lo} or {lo + patch} (and tiles of that size)"]
    return []


def check_necks(necks: list[Any], registry) -> list[str]:
    from terratorch.registry import TERRATORCH_NECK_REGISTRY as own

    issues = []
    for i, neck in enumerate(necks):
        name = neck.get("name") if isinstance(neck, dict) else None
        if not isinstance(name, str):
            continue  # the config reports a neck without a name
        key = f"model.necks[{i}]"
        if name not in registry:
            issues.append(_nearest(name, list(own), "neck", f"{key}.name"))
        elif registry.find_registry(name) is own:
            acc = kwargs_of(registry.find_class(name))
            given = {k: v for k, v in neck.items() if k != "name"}
            valid = acc.names - set(positional_names(registry.find_class(name))[:1])  # channel_list: the factory's
            issues += unknown_keys(given, valid, key, acc.forced, f"neck {name}") if acc.closed else []
    return issues


def check_decoder_and_head(decoder: str, dkw: dict[str, Any], hkw: dict[str, Any], kind: TaskKind,
                           registry) -> list[str]:
    import terratorch.models.heads
    from terratorch.registry import TERRATORCH_DECODER_REGISTRY as own

    if decoder not in registry:
        return [_nearest(decoder, list(own), "decoder (smp_/mmseg_ prefixes reach those libraries)",
                         "model.decoder")]
    source, cls = registry.find_registry(decoder), registry.find_class(decoder)
    includes_head = bool(getattr(source, "includes_head", False))
    issues = []
    if source is own:
        acc = kwargs_of(cls)
        # the factory passes the channel list first, and num_classes to decoders that hold their head
        valid = acc.names - set(positional_names(cls)[:1]) - ({"num_classes"} if includes_head else set())
        issues += unknown_keys(dkw, valid, "model.decoder_kwargs", acc.forced, f"decoder {decoder}") if acc.closed else []
    else:
        _unchecked("model.decoder_kwargs", decoder, "its constructor is another library's (smp/mmseg)")
    if includes_head and hkw:
        return issues + [f"model.head_kwargs: decoder {decoder} includes its head; remove model.head_kwargs"]
    head = getattr(terratorch.models.heads, kind.head)
    acc = kwargs_of(head)
    # terrascale sets the head's input width and task.num_classes (or 1 output) itself
    set_here = {"in_channels", "num_classes", "num_outputs"}
    issues += unknown_keys(hkw, acc.names - set_here, "model.head_kwargs", set_here, f"TerraTorch's {head.__name__}")
    return issues


def check_resume(checkpoint: dict[str, Any]) -> list[str]:
    resume = checkpoint.get("resume")
    if not isinstance(resume, str) or resume == "auto":
        return []
    from trainer.train.checkpoint import is_complete

    path = Path(resume)
    if not path.is_dir():
        return [f"checkpoint.resume: {path} does not exist; give a step-XXXXXX directory of a job, 'auto' (newest "
                "complete checkpoint of checkpoint.dir) or false"]
    if not is_complete(path):
        return [f"checkpoint.resume: {path} is not a complete checkpoint (no completion marker); it was probably "
                "interrupted while saving: give an older step-XXXXXX directory or 'auto'"]
    return []


LATER = ("(the model section is checked against TerraTorch's registries (backbone, necks, decoder, their kwargs, "
         "bands, img_size) once these are fixed)")


def deepspeed_problems(exp: Experiment) -> list[str]:
    """The run's own DeepSpeed refusals for the profile the experiment names, found before anything is imported
    or built: its JSON rendered with the experiment (`deepspeed.config_for`: "auto" NVMe path without
    memory.nvme_path, values that disagree with the experiment, keys DeepSpeed rejects) and `check_deepspeed`
    (ZeRO combinations, 8-bit optimizer states). The run renders and checks again with the same functions once
    the dataset's length gives the total steps; only a JSON scheduler's "auto" step counts depend on it, and they
    are never refused, so run.max_steps stands in here. Not for `auto` (the planner chooses the profile later) nor
    for a `terratorch fit` file (its datamodule gives the batch size the JSON is rendered with)."""
    from trainer.memory import deepspeed as ds
    from trainer.memory.profiles import check_deepspeed, precision_for, profile_for
    from trainer.runtime import cuda_available, world_size

    if exp.terratorch is not None or exp.memory.profile == "auto":
        return []
    try:
        profile = profile_for(exp, exp.memory.profile)
        on_gpu = profile.deepspeed is not None and exp.run.precision == "auto" and cuda_available()
        cfg = ds.config_for(exp, profile, precision_for(exp, profile, on_gpu), world_size(), exp.run.max_steps or 1)
        check_deepspeed(exp, profile, cfg)
    except ConfigError as e:
        return e.issues
    return []


def load_checked(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """`load_experiment` plus the registry checks. In two rounds: the checks that need no TerraTorch (the typed
    config, checkpoint.resume, the named profile's DeepSpeed config: `deepspeed_problems`), every problem found
    raised at once; only if they pass, the registry checks
    (backbone, necks, decoder, their kwargs, bands, img_size), again all at once."""
    raw = load_raw(path, overrides)  # unreadable / empty / non-mapping files stop here: nothing else to check
    source = str(path) if path else "defaults"
    issues: list[str] = []
    exp = None
    try:
        exp = experiment_from_raw(raw, source, from_file=path is not None)
    except ConfigError as e:
        issues += e.issues
    issues += check_resume(_section(raw, "checkpoint"))
    if not issues:
        issues += deepspeed_problems(exp)
    if issues:  # reported before the TerraTorch import (12-36 s): most mistakes exit in a few seconds
        raise ConfigError(issues, source=source, note=LATER)
    if exp.terratorch is None:
        issues += check_model(_section(raw, "model"), exp.task.kind)
    else:  # a `terratorch fit` file: TerraTorch's own parser checks it now, not after the accelerator is up
        from trainer.model.terratorch_task import check

        issues += check(exp.terratorch, exp.run.seed)
    if issues:
        raise ConfigError(issues, source=source)
    return exp
