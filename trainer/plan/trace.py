"""One training step traced for memory (torch's MemTracker) and FLOPs (FlopCounterMode).

The planner runs this on *fake* tensors (`FakeTensorMode`): shapes, dtypes and strides without storage, so a
step of a 40B model costs seconds and no RAM. The fake device is the CPU (fake CUDA needs a driver), which
decides two things about the estimate:
- `scaled_dot_product_attention` dispatches to the flash-attention CPU kernel (checked: also with a mask). It
  keeps the output and a logsumexp per query, O(L) memory, like the flash / memory-efficient kernels SDPA
  picks on a GPU; the math kernel (which would keep the L×L probabilities) is never traced.
- autocast follows CPU autocast's op lists (matmuls in bf16, as on CUDA).
The validation test runs the same function on real CPU tensors with a real optimizer step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

# MemTracker's categories → the planner's names.
KINDS = {_MemRefType.PARAM: "params", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "grads",
         _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporaries", _MemRefType.OPT: "optimizer",
         _MemRefType.OTH: "other"}
TOTAL = "total"


@dataclass(frozen=True)
class StepTrace:
    """Bytes by kind at the moment the total peaked, and just after the forward pass.

    `peak` counts what the tracker saw. With `virtual_grads` the parameter gradients were freed as soon as they
    were complete (what DeepSpeed does: it reduces them into its own buckets), so `peak` is the step without
    them, and `peak_with_grads` is the same step as if every gradient had stayed (what Accelerate does), both
    from one trace.
    """

    peak: dict[str, int]
    peak_with_grads: dict[str, int]
    after_forward: dict[str, int]
    flops: int
    outputs: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype) of each tensor forward returned


class StepTracker(MemTracker):
    """MemTracker with these changes for the planner (checked against the stock class on small models):

    - It hooks gradients of trainable parameters only: the stock tracker registers a hook on every parameter,
      which torch refuses for frozen ones (LoRA, QLoRA, a frozen backbone).
    - It keeps the global peak only: the stock per-op update walks every tracked module to keep per-module
      peaks we never read, O(modules) per op (an InternViT-6B step took 194 s instead of seconds).
    - `virtual_grads`: see `StepTrace`.
    """

    def __init__(self, virtual_grads: bool = False):
        super().__init__()
        self.virtual_grads = virtual_grads
        self._grads_so_far = 0
        self.peak_with_grads: dict[str, int] = {}
        self._peak_with_grads_total = -1

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (p.register_hook(self._grad_seen),
                                                           p.register_post_accumulate_grad_hook(self._grad_done))
        return sizes

    # A module built for one call (some TerraTorch necks do) is gone by backward: nothing to attribute, and
    # the stock hooks would warn once per such module.
    def _pre_bw_hook(self, module: nn.Module | None, args) -> None:
        if module is not None:
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module: nn.Module | None, args) -> None:
        if module is not None:
            super()._post_bw_hook(module, args)

    def _grad_seen(self, grad: torch.Tensor) -> None:
        if not self.virtual_grads:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _grad_done(self, param: torch.Tensor) -> None:
        if not self.virtual_grads:
            self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            return
        self._grads_so_far += param.grad.numel() * param.grad.element_size()
        param.grad = None
        self._update_peak_stats(None)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
        now = by_kind(self._curr_mem_snap)
        now["grads"] += self._grads_so_far
        now[TOTAL] += self._grads_so_far
        if now[TOTAL] > self._peak_with_grads_total:
            self._peak_with_grads_total, self.peak_with_grads = now[TOTAL], now


class FlopCounter(TorchDispatchMode):
    """FLOPs of matmuls, convolutions and attention, by torch's own formulas (`flop_counter.flop_registry`).

    Not `FlopCounterMode`: its per-module attribution hooks keep module outputs alive through backward, which
    inflated a traced InternVL step by ~200 MB per layer. The CPU flash-attention kernel the fake trace runs is
    counted with the formulas torch registers for the GPU flash kernel (same arithmetic).
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        aten = torch.ops.aten
        self.registry = {**flop_registry,
                         aten._scaled_dot_product_flash_attention_for_cpu:
                             flop_registry[aten._scaled_dot_product_flash_attention],
                         aten._scaled_dot_product_flash_attention_for_cpu_backward:
                             flop_registry[aten._scaled_dot_product_flash_attention_backward]}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def by_kind(snapshot: dict) -> dict[str, int]:
    out = dict.fromkeys([*KINDS.values(), TOTAL], 0)
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            out[KINDS.get(key, TOTAL)] += int(value)
    return out


def _outputs(out: Any) -> tuple[tuple[tuple[int, ...], str], ...]:
    if isinstance(out, torch.Tensor):
        return ((tuple(out.shape), str(out.dtype).removeprefix("torch.")),)
    if isinstance(out, (list, tuple)):
        return tuple(s for o in out for s in _outputs(o))
    if hasattr(out, "output"):  # TerraTorch ModelOutput
        return _outputs(out.output)
    return ()


def sum_loss(out: Any) -> torch.Tensor:
    """A loss whose gradient reaches every output (what a head does to a backbone's features)."""
    if hasattr(out, "output"):
        out = out.output
    tensors = [out] if isinstance(out, torch.Tensor) else list(out)
    return sum(t.float().sum() for t in tensors)


def trace_step(model: nn.Module, make_inputs: Callable[[], tuple], loss_fn: Callable[[Any], torch.Tensor] = sum_loss,
               *, autocast: torch.dtype | None = None, optimizer: torch.optim.Optimizer | None = None,
               grad_clip: float | None = None, fake_mode=None, count_flops: bool = True) -> StepTrace:
    """Forward, backward and (if given) optimizer step of `model` on `make_inputs()`, tracked.

    Inputs are created inside the tracker (the batch lives on the device during the step). With an optimizer,
    call this on the second step so its states exist already (the planner's real-tensor validation does).
    """
    tracker = StepTracker(virtual_grads=optimizer is None and fake_mode is not None)
    tracker.track_external(model, *([optimizer] if optimizer is not None else []))
    flop_counter = FlopCounter() if count_flops else contextlib.nullcontext()
    amp = (torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext())
    twins = SmallTensorTwins(fake_mode) if fake_mode is not None else contextlib.nullcontext()
    with fake_mode or contextlib.nullcontext(), twins, tracker, flop_counter:
        inputs = make_inputs()
        with amp:
            out = model(*inputs)
        after_forward = by_kind(tracker.get_tracker_snapshot("current"))
        loss = loss_fn(out)
        if loss.requires_grad:  # a frozen backbone under a trained head never runs backward
            loss.backward()
        if optimizer is not None:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        outputs = _outputs(out)
        del out
    flops = flop_counter.total if count_flops else 0
    peak = by_kind(tracker.get_tracker_snapshot("peak"))
    return StepTrace(peak=peak, peak_with_grads=tracker.peak_with_grads if tracker.virtual_grads else peak,
                     after_forward=after_forward, flops=int(flops), outputs=outputs)


def trace_forward(model: nn.Module, make_inputs: Callable[[], tuple], *, fake_mode=None,
                  count_flops: bool = True) -> dict[str, Any]:
    """One forward pass of `model` under `torch.no_grad()` (prediction: no saved activations, no gradients),
    tracked: {"peak": bytes by kind at the total's peak, "flops", "outputs"}. Inputs are created inside the
    tracker (the window batch lives on the device). Same tracker and FLOP counter as `trace_step`."""
    tracker = StepTracker()
    tracker.track_external(model)
    flop_counter = FlopCounter() if count_flops else contextlib.nullcontext()
    twins = SmallTensorTwins(fake_mode) if fake_mode is not None else contextlib.nullcontext()
    with fake_mode or contextlib.nullcontext(), twins, tracker, flop_counter, torch.no_grad():
        inputs = make_inputs()
        out = model(*inputs)
        outputs = _outputs(out)
        del out, inputs
    return {"peak": by_kind(tracker.get_tracker_snapshot("peak")),
            "flops": int(flop_counter.total) if count_flops else 0, "outputs": outputs}


class SmallTensorTwins(TorchDispatchMode):
    """Real twins of small tensors computed from Python data, so index bookkeeping runs on fake tensors.

    Some models compute sequence boundaries from values (Qwen2-VL: `repeat_interleave(h*w, t)`, then
    `.tolist()` to split attention per image), which fake tensors refuse. A tensor built from Python data
    (`torch.tensor`, `arange`), and everything computed only from such tensors, gets a real copy while it stays
    small (<= `LIMIT` elements): ops on twins run for real and hand back a fake tensor with the twin attached,
    and `.tolist()`/`.item()` return real values. Anything touching an activation stays fake. It is a
    *dispatch* mode because checkpoint recomputation in backward sees dispatch modes but not function modes.
    """

    LIMIT = 1 << 16

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.twins: Any = WeakIdKeyDictionary()

    def _real(self, a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        return self.twins.get(a) if isinstance(a, FakeTensor) else a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in args:  # the common case, decided cheaply: an activation is involved
            if isinstance(a, FakeTensor) and a not in self.twins:
                return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        real_flat = [self._real(a) for a in flat]
        if any(isinstance(a, torch.Tensor) and r is None for a, r in zip(flat, real_flat)) or (
                not tensors and not _small_factory(func, kwargs)):
            return func(*args, **kwargs)
        real_args, real_kwargs = tree_unflatten(real_flat, spec)
        with unset_fake_temporarily():
            real = func(*real_args, **real_kwargs)
        if any(isinstance(r, torch.Tensor) and r.numel() > self.LIMIT for r in tree_flatten(real)[0]):
            return func(*args, **kwargs)
        if func._schema.is_mutable:  # in place: the fake keeps its identity and is updated as well
            func(*args, **kwargs)
            return args[0]
        return tree_map_only(torch.Tensor, self._fake_twin, real)

    def _fake_twin(self, real: torch.Tensor) -> torch.Tensor:
        fake = self.fake_mode.from_tensor(real)
        self.twins[fake] = real
        return fake


def _small_factory(func, kwargs) -> bool:
    # arange/scalar_tensor from Python numbers; sizes are checked after running
    return func in (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step,
                    torch.ops.aten.scalar_tensor.default)


# --- preparing a model for a trace --------------------------------------------------------------------
def set_dtype_(module: nn.Module, dtype: torch.dtype, only: Callable[[nn.Module, str], bool] = lambda m, n: True
               ) -> nn.Module:
    """Cast floating parameters/buffers in place by replacing them: `Module.to` cannot swap fake tensors."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype and only(mod, name):
                mod._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype and only(mod, name):
                mod._buffers[name] = b.to(dtype)
    return module


def meta_to_fake_(module: nn.Module) -> nn.Module:
    """Give a meta-device module fake CPU tensors (call inside the FakeTensorMode). A tensor the build left on
    the CPU (the legacy `torch.Tensor(...)` constructor ignores `torch.device("meta")`: smp's first-conv patch for
    other band counts) is replaced too: the trace must not touch real storage."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not isinstance(p, FakeTensor):
                mod._parameters[name] = nn.Parameter(_fake_like(p), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, FakeTensor):
                mod._buffers[name] = _fake_like(b)
    return module


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    # empty_like would hand the meta tensor itself to the fake mode, which refuses non-fake inputs
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


class TraceLoraLinear(nn.Module):
    """What peft's LoRA layer does to memory, without importing peft (it imports Accelerate, 8 s).

    Same ops in the same order as peft 0.21 `lora.Linear.forward` (base output; input cast to the adapter dtype
    when they differ; `lora_B(lora_A(dropout(x))) * scaling`; cast back) and, for a 4-bit base, peft's
    `lora.bnb.Linear4bit.forward` (the base output is cloned, and the input is cast only outside autocast).
    The validation test checks the traced peak against real peft on CPU.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: int, dropout: float, four_bit: bool = False):
        super().__init__()
        self.base_layer, self.four_bit, self.scaling = base, four_bit, alpha / rank
        dtype = base.weight.dtype if not four_bit else torch.float32
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=dtype, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=dtype, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # peft's layers answer `.weight`/`.bias` with the base layer's (fused kernels read them directly)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.four_bit:
            result = result.clone()
            cast = not torch.is_autocast_enabled(x.device.type)
            expected = result.dtype
            if cast and x.dtype != self.lora_A.weight.dtype:
                x = x.to(self.lora_A.weight.dtype)
            out = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
            return result + (out.to(expected) if cast else out)
        dtype = result.dtype
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(dtype)


def matches_target(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the module name equals one or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_trace_lora_(module: nn.Module, targets: list[str], rank: int, alpha: int, dropout: float,
                    four_bit: bool = False) -> int:
    """Freeze `module` and wrap its target `nn.Linear`s (peft's own type check) with `TraceLoraLinear`."""
    for p in module.parameters():
        p.requires_grad_(False)
    hits = [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear and matches_target(n, targets)]
    for name, lin in hits:
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, name.rsplit(".", 1)[-1], TraceLoraLinear(lin, rank, alpha, dropout, four_bit))
    return len(hits)
