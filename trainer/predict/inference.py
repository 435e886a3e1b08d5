"""Load a job's model for inference at a chosen precision: `load_for_inference(export_dir, precision=...)`.

- LoRA/QLoRA exports (export.json kind "lora"): the frozen base is streamed from the job's `pretrained_path`
  (or `base=`) by the same loader training used (trainer.backbones.stream), after its fingerprint was checked
  against the one the export recorded: NF4 or int8 quantized on arrival, or held in bf16/fp32. The export's
  tensors (necks, decoder, head, our backbone modules) go on top, then the peft adapters. Never a merged or
  dequantized copy of the backbone.
- Full exports: the plain model with model.safetensors; `nf4`/`int8` then quantize the backbone's linears,
  `bf16` holds it in bf16.
- Exports written before export.json: model.merged.safetensors (LoRA) or model.safetensors, as before.

Compute: bf16 under autocast for `bf16`, and for `nf4`/`int8` on a GPU; fp32 for `fp32` and for `nf4`/`int8`
on a CPU (bf16 matmuls are ~10x slower than fp32 on this class of CPU; the weights stay 4/8-bit either way).
Default precision: what the job trained with (its quantization, else its precision).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.config import Experiment, load_experiment
from trainer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PRECISIONS = ("nf4", "int8", "bf16", "fp32")


@dataclass
class InferenceModel:
    model: nn.Module
    exp: Experiment
    export: Path
    precision: str
    compute_dtype: torch.dtype
    device: torch.device
    manifest: dict

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights hold (4-bit layers packed), buffers included."""
        seen, total = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def __call__(self, x: torch.Tensor):
        from trainer.model.models import model_output

        with torch.inference_mode(), self.autocast():
            return model_output(self.model(x.to(self.device)))


def default_precision(manifest: dict) -> str:
    """The weights' precision when --precision is not given: the quantization the job trained with, else its
    compute precision. An fp16-trained job predicts in fp32 (predict has no fp16 path; fp32 holds every fp16
    value)."""
    q = manifest.get("quantization") or "none"
    if q != "none":
        return q
    trained = manifest.get("precision") or "fp32"
    return "fp32" if trained == "fp16" else trained


def compute_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    if precision == "bf16" or (precision in ("nf4", "int8") and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def check_base(manifest: dict, base: str | None) -> str:
    """The base checkpoint to stream: `base` or the recorded path, refused unless its fingerprint matches."""
    from trainer.train.basehash import FULL_METHOD, checkpoint_fingerprint

    want = manifest["base"]
    path = base or want["path"]
    if not Path(path).expanduser().exists():
        raise DataError(f"base checkpoint {path} (the job's model.backbone_kwargs.pretrained_path) does not exist: "
                        "the export holds only what training changed; give the checkpoint it was trained on with "
                        "--base PATH")
    got = checkpoint_fingerprint(path, want.get("allow_pickle", False), content=want.get("method") == FULL_METHOD)
    if got["sha256"] != want["sha256"]:
        raise DataError(f"base checkpoint {path} is not the one this export was trained on: fingerprint "
                        f"{got['sha256'][:16]}… ({got['method']}, {len(got['files'])} files, {got['bytes']} bytes) vs "
                        f"{want['sha256'][:16]}… recorded in export.json ({len(want['files'])} files, "
                        f"{want['bytes']} bytes); give the original checkpoint with --base PATH (its adapters and head "
                        "only make sense on that base)")
    return str(path)


def _with_base(exp: Experiment, path: str) -> Experiment:
    kwargs = dict(exp.model.backbone_kwargs)
    if "pretrained_path" in kwargs or not exp.model.pretrained_path:
        kwargs["pretrained_path"] = path
        return exp.model_copy(update={"model": exp.model.model_copy(update={"backbone_kwargs": kwargs})})
    return exp.model_copy(update={"model": exp.model.model_copy(update={"pretrained_path": path})})


def _add_adapters(model: nn.Module, adapter_dir: Path) -> int:
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    cfg.inference_mode = True
    model.encoder = get_peft_model(model.encoder, cfg)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model.encoder, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise DataError(f"{adapter_dir}: the adapters do not fit the model built from the export's config.yaml "
                        f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}); re-export the job")
    return len(weights)


def _load_lora(exp: Experiment, export: Path, manifest: dict, precision: str, compute: torch.dtype,
               device: torch.device, base: str | None) -> nn.Module:
    from safetensors.torch import load_file

    from trainer.backbones.stream import LoadSpec
    from trainer.model.fitting import quantize_linears
    from trainer.model.models import build_model
    from trainer.train.export import ADAPTER_DIR, MODEL_FILE, base_names

    if manifest.get("base"):
        exp = _with_base(exp, check_base(manifest, base))
    quant = precision if precision in ("nf4", "int8") else "none"
    spec = LoadSpec(frozen=True, compute_dtype=compute, quantization=quant, device=str(device))
    model = build_model(exp, spec)
    rest = load_file(str(export / MODEL_FILE))
    held = model.state_dict()
    provided = base_names(model, trained=False) if manifest.get("base") else set()
    unexpected = [k for k in rest if k not in held]
    missing = [k for k in held if k not in rest and k.rsplit(".weight.", 1)[0] + ".weight" not in provided
               and k not in provided]
    if unexpected or missing:
        raise DataError(f"{export / MODEL_FILE} does not fit the model its config.yaml builds (unexpected "
                        f"{unexpected[:3]}, missing {missing[:3]}); re-export the job with this terrascale version")
    model.load_state_dict(rest, strict=False)
    del rest
    if quant != "none":  # layers the base did not fill (ours) are quantized like training's apply_profile does
        quantize_linears(model.encoder, quant, compute)
    n = _add_adapters(model, export / ADAPTER_DIR)
    log.info("adapters: %d tensors from %s", n, export / ADAPTER_DIR)
    return model


def _load_full(exp: Experiment, export: Path, manifest: dict, precision: str, compute: torch.dtype) -> nn.Module:
    from trainer.model.fitting import quantize_linears
    from trainer.train.export import MERGED_FILE, load_exported

    if manifest.get("kind") not in ("full", "merged"):
        raise DataError(f"{export}/export.json: unknown export kind {manifest.get('kind')!r}; re-export the job")
    model = load_exported(exp, export)  # merged weights when present (exports before export.json)
    if precision in ("nf4", "int8"):
        n = quantize_linears(model.encoder, precision, compute)
        log.info("quantized %d backbone linear layers of %s to %s", n, MERGED_FILE if manifest["kind"] == "merged"
                 else "the export", precision)
    elif precision == "bf16":
        model.encoder.to(torch.bfloat16)
    return model


def load_for_inference(export: Path, precision: str | None = None, device: str | torch.device | None = None,
                       base: str | None = None) -> InferenceModel:
    """The job's model from its export dir, ready for `InferenceModel(x)`; `base` overrides the base checkpoint's
    path (it must have the recorded fingerprint)."""
    from trainer.train.export import read_manifest

    export = Path(export)
    exp = load_experiment(export / "config.yaml")
    manifest = read_manifest(export)
    precision = precision or default_precision(manifest)
    if precision not in PRECISIONS:
        raise ConfigError([f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}"])
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = compute_dtype_for(precision, dev)
    log.info("loading %s for inference: %s export, %s weights, %s compute on %s", export, manifest["kind"],
             precision, str(compute).removeprefix("torch."), dev)
    if manifest["kind"] == "lora":
        model = _load_lora(exp, export, manifest, precision, compute, dev, base)
    else:
        model = _load_full(exp, export, manifest, precision, compute)
    model.requires_grad_(False)
    model = model.to(dev).eval()
    _guard_cpu_packing(model)
    return InferenceModel(model, exp, export, precision, compute, dev, manifest)


def _guard_cpu_packing(model: nn.Module) -> int:
    """Prediction may use bitsandbytes' AVX512-bf16 CPU kernel (training keeps it off: `fitting.training_numerics`):
    on for the 4-bit layers it can take (at least one quantization block per row; tiny test models' narrower layers
    fail in it), off for the rest. Returns how many layers use it."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16  # bitsandbytes' own probe

    count = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            m.support_avx512bf16_for_cpu = bool(has_avx512bf16() and qs is not None and not m.in_features % qs.blocksize)
            count += m.support_avx512bf16_for_cpu
    return count


# --- windows per batch ------------------------------------------------------------------------------
def per_window_bytes(im: InferenceModel, sample: torch.Tensor) -> int:
    """Activation bytes one window needs without gradients: the largest module output of a one-window forward,
    times 4 (its input, its output and two temporaries alive at once). A simple bound, no trace."""
    largest = [0]

    def hook(_m, _i, out):
        for t in (out if isinstance(out, (list, tuple)) else [getattr(out, "output", out)]):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in im.model.modules()]
    try:
        im(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return 4 * largest[0]


def device_budget(device: torch.device) -> int:
    """Bytes inference may still use: 80 % of the GPU's free memory, or half of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


def windows_per_batch(im: InferenceModel, sample: torch.Tensor, budget: int | None = None, cap: int = 64) -> int:
    """How many windows fit one forward pass on the device (weights are already resident)."""
    need = max(1, per_window_bytes(im, sample))
    budget = device_budget(im.device) if budget is None else budget
    batch = int(max(1, min(cap, budget // need)))
    log.info("windows per batch: %d (%.1f MB per window, %.2f GB free for activations, weights %.2f GB)", batch,
             need / 1e6, budget / 1e9, im.weight_bytes / 1e9)
    return batch
