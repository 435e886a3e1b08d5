"""Measuring one experiment once for every profile: parameter counts and traced steps, memoised.

Own catalog backbones: meta-device counts and reduced-depth traces (`workload.py`) plus the decoder trace
(`head.py`); TerraTorch-built backbones: the whole model traced (`head.whole_step`).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.config import Experiment
from trainer.memory.profiles import PROFILES, Profile
from trainer.plan import head as head_mod
from trainer.plan import workload as wl


def loads_checkpoint(exp: Experiment) -> bool:
    kw = exp.model.backbone_kwargs
    return bool(exp.model.pretrained_path or kw.get("pretrained_path") or kw.get("pretrained"))


def _above_weights(peak: dict) -> int:
    return peak["total"] - peak["params"] - peak["buffers"]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class Measurer:
    """Counts and traced steps of one experiment, each measured once for every profile that needs it."""

    def __init__(self, exp: Experiment, shape: wl.InputShape, builders: head_mod.Builders | None,
                 loads: bool | None = None, own: wl.OwnBackbone | None = None, model_name: str | None = None):
        self.exp, self.shape, self.builders = exp, shape, builders
        # set: the model (this class name) has no backbone terrascale can find (planner.estimate refuses the
        # profiles that adapt one)
        self.model_name = model_name
        self.loads = loads_checkpoint(exp) if loads is None else loads
        self.own = own or wl.own_backbone(exp)
        self.measured_now: list[str] = []
        self._memo: dict[str, Any] = {}

    def once_per_plan(self, key: str, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def own_counts(self, profile: Profile) -> dict:
        from trainer.backbones.factory import family_class
        from trainer.model.fitting import lora_targets
        from trainer.plan import plan_cache
        b = self.own
        targets = lora_targets(family_class(b.family), profile) if profile.lora else None
        rank = profile.lora.rank if profile.lora else None

        def compute() -> dict:
            model = wl.build(b)
            counts = wl.count_params(model, targets, rank)
            return {**counts, "stacks": wl.stacks(b, model), "n_outputs": len(model.out_indices),
                    "out_channels": list(model.out_channels), "targets": targets}

        key = {"kind": "counts", **b.spec, "targets": targets, "rank": rank}
        return self.once_per_plan(str(key), lambda: plan_cache.cached(key, compute)[0])

    def step(self, profile: Profile, precision: str) -> tuple[dict, dict]:
        """(counts incl. head, dynamic step) for `profile`."""
        if self.own is None:
            return self._whole(profile, precision)
        counts = self.own_counts(profile)
        mode = wl.trace_mode(profile, precision, self.exp, counts["targets"])
        bb = self.once_per_plan(str(mode.key()), lambda: self._backbone(counts, mode))
        feature, out_channels = self._fused(bb["outputs"][0], counts["out_channels"])
        n = counts["n_outputs"]
        head = self.once_per_plan(f"head{mode.precision}{mode.autocast}",
                          lambda: self._head(mode, feature, n, out_channels))
        grad_bytes = head["params"] * (4 if mode.autocast or mode.precision == "fp32" else wl.BYTES[mode.precision])
        dyn = head_mod.combine(bb, head, keep_grads=profile.deepspeed is None, head_grad_bytes=grad_bytes)
        return {**counts, "head": head["params"], "head_largest": head["largest_layer"]}, dyn | {"mode": mode}

    def forward(self, compute: str) -> tuple[dict, dict]:
        """(counts incl. head, forward trace) of prediction in the compute dtype `compute` (fp32 | bf16): the
        window batch's forward under no_grad (`workload.inference_mode`). dyn: "peak" = the bytes above the
        weights at the forward's highest moment (activations, temporaries, the input batch), "buffers", "flops"."""
        mode = wl.inference_mode(compute)
        if self.own is None:
            def run():
                res, hit = head_mod.whole_step(self.exp, self.shape, mode, self.builders, lambda encoder: None)
                if not hit:
                    self.measured_now.append(f"whole model forward at {compute}")
                return res

            res = self.once_per_plan(str(mode.key()), run)
            counts = {**res["counts"], "head": res["head_params"], "head_largest": res["largest_layer"]}
            return counts, {"peak": _above_weights(res["peak"]), "buffers": res["peak"]["buffers"],
                            "flops": res["flops"]}
        counts = self.own_counts(PROFILES["full"])
        bb = self.once_per_plan(str(mode.key()), lambda: self._backbone(counts, mode))
        feature, out_channels = self._fused(bb["outputs"][0], counts["out_channels"])
        n = counts["n_outputs"]
        head = self.once_per_plan(f"head{mode.key()}", lambda: self._head(mode, feature, n, out_channels))
        # the backbone's own peak, or its output features held while the decoder runs on them (under no_grad
        # nothing else of the backbone's forward is alive by then)
        features = n * _numel(feature[0]) * getattr(torch, feature[1]).itemsize
        peak = max(_above_weights(bb["peak"]), features + _above_weights(head["peak"]))
        return ({**counts, "head": head["params"], "head_largest": head["largest_layer"]},
                {"peak": peak, "buffers": bb["peak"]["buffers"] + head["peak"]["buffers"],
                 "flops": bb["flops"] + head["flops"]})

    def _fused(self, feature: list, out_channels: list[int]) -> tuple[list, list[int]]:
        """Change detection: the shared encoder ran on B x T images; the decoder gets B fused samples, with
        T x the channels for concat (trainer.model.temporal.SharedEncoder). The fusion's own few feature-sized
        tensors are not traced."""
        t = self.shape.dates
        if t == 1:
            return feature, out_channels
        k = t if self.exp.task.date_fusion == "concat" else 1
        (_, channels, *rest), dtype = feature
        return [[self.shape.batch, channels * k, *rest], dtype], [c * k for c in out_channels]

    def _backbone(self, counts: dict, mode: wl.TraceMode) -> dict:
        # a shared encoder runs over every date: T x the images, one set of weights
        bb = wl.backbone_step(self.own, counts["stacks"], mode, self.shape.per_date())
        if bb["traced_now"]:
            self.measured_now.append(f"backbone at {mode.precision}{' autocast' if mode.autocast else ''}"
                                     f"{', checkpointed' if mode.grad_checkpointing else ''}"
                                     f"{', LoRA' if mode.lora else ''} ({bb['traced_now']} traces)")
        return bb

    def summary(self) -> dict[str, int]:
        """Parameter counts for the report (head: from whichever decoder measurement ran)."""
        if self.own is not None:
            c = self.own_counts(PROFILES["full"])
            heads = [v["params"] for k, v in self._memo.items() if k.startswith("head")]
            return {"backbone": c["total"], "linear_weights": c["linear_weights"], "head": heads[0] if heads else None}
        wholes = [v for v in self._memo.values() if isinstance(v, dict) and "counts" in v]
        if not wholes:
            return {}
        return {"backbone": wholes[0]["counts"]["total"], "linear_weights": wholes[0]["counts"]["linear_weights"],
                "head": wholes[0]["head_params"]}

    def _head(self, mode: wl.TraceMode, feature: list, n: int, out_channels: list[int]) -> dict:
        head, hit = head_mod.head_step(self.exp, [feature[0]] * n, [feature[1]] * n, out_channels,
                                       self.shape, mode, self.builders)
        if not hit:
            self.measured_now.append(f"decoder at {mode.precision}{' autocast' if mode.autocast else ''}")
        return head

    def _whole(self, profile: Profile, precision: str) -> tuple[dict, dict]:
        from trainer.model.fitting import lora_targets

        mode = wl.trace_mode(profile, precision, self.exp, None)  # LoRA targets come from the built model

        def run():
            res, hit = head_mod.whole_step(self.exp, self.shape, mode, self.builders,
                                           lambda encoder: lora_targets(encoder, profile) if profile.lora else None)
            if not hit:
                self.measured_now.append(f"whole model at {precision} ({profile.name})")
            return res

        res = self.once_per_plan(str(mode.key()), run)
        counts = {**res["counts"], "head": res["head_params"], "head_largest": res["largest_layer"]}
        peak = res["peak_with_grads" if profile.deepspeed is None else "peak"]
        dyn = {"peak": {k: peak[k] for k in ("grads", "activations", "temporaries")},
               "flops": res["flops"], "buffers": res["peak"]["buffers"], "mode": mode}
        return counts, dyn
