"""Process environment that must be right before DeepSpeed or Accelerate are imported.

- No CUDA: DeepSpeed must use its CPU accelerator (`DS_ACCELERATOR=cpu`) and gloo.
- DeepSpeed JIT-compiles ops on first use (30-60 s each): cache them in a folder the venv owns.
- A plain `python launch/train.py` (no launcher) still needs the torch.distributed variables.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

from trainer.launch_hook import PID_ENV

log = logging.getLogger("terrascale")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# The commands whose start-up runs with Python's cyclic garbage collector paused (`pause_gc_for_start_up`).
GC_PAUSED_COMMANDS = ("train", "predict")


def pause_gc_for_start_up(command: str | None) -> None:
    """At a process's entry (`launch/train.py`, `launch/predict.py`, `terrascale`, `python -m trainer`), for
    `train` and `predict`: no cyclic garbage collection until `gc_after_start_up`.

    Start-up imports ~9,000 modules (torch, DeepSpeed, TerraTorch, transformers) and builds the model: millions of
    long-lived objects, which every full collection walks again, during start-up, during training and once more
    at interpreter exit. Measured on a 2-step tiny ZeRO-3 + CPU offload run (user CPU, 3 runs each): 12.9-14.9 s
    as Python does it, 7.4-10.1 s paused through start-up and frozen before the first step. Reference counting
    still frees everything that is not part of a cycle meanwhile. A command that ends before
    `gc_after_start_up` (a config error, `--help`) ends with the collector still paused."""
    if command in GC_PAUSED_COMMANDS:
        gc.disable()


def gc_after_start_up() -> None:
    """Start-up is over (training: before the first step; predict: the model is loaded): what exists now lives
    until the process ends, so it is frozen (`gc.freeze`: no collection walks it again, nor the one at exit), and
    the collector runs again for what the work itself allocates. Nothing to do where the collector was not
    paused (an in-process caller of `trainer.cli.main`)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def world_size() -> int:
    """How many processes this run has: WORLD_SIZE as the launcher (accelerate launch, torchrun) sets it, 1 for a
    lone process. Read before the Accelerator exists (steps per epoch, the DeepSpeed batch, the resume check);
    afterwards `accelerator.num_processes` says the same."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment(deepspeed: bool) -> None:
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # Single process without a launcher: DeepSpeed otherwise looks for MPI. Without DeepSpeed these would
    # only make Accelerate wrap a lone process in DDP, so leave them unset then.
    if deepspeed and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def skip_cpu_shm_comm() -> None:
    """DeepSpeed on its CPU accelerator JIT-compiles its shared-memory all-reduce op (shm_comm: ~55 s of CPU, 30 s
    to 6 min on a 2-core machine) in the first process that initializes its communication backend, and loads it in
    every later one. The op serves only `deepspeed.comm.inference_all_reduce` (the tensor-parallel layers of
    DeepSpeed inference), which ZeRO training never calls; without it that call takes torch.distributed's all_reduce.
    So the op is marked unavailable before a CPU DeepSpeed run initializes (gloo does every collective); GPU runs
    are untouched (their accelerator has no such op)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def quiet_libraries() -> None:
    """Third-party deprecation chatter buries our own messages; real errors still surface."""
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "terratorch", "timm", "rasterio",
                 "accelerate", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|terratorch|timm|deepspeed|accelerate)")


class _DropHarmlessZero3Warning(logging.Filter):
    """ZeRO-3 warns that it cannot see tensors inside TerraTorch's `ModelOutput`. The hooks it means fetch a
    module's *own* parameters before backward; the top-level TerraTorch model owns none (encoder, decoder and
    head are submodules whose outputs are plain tensors), so nothing is missed. The resume-equality tests under
    ZeRO-3 would fail if gradients were wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ModelOutput" not in record.getMessage()


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    quiet_libraries()
    from deepspeed.utils import logger as ds_logger

    ds_logger.addFilter(_DropHarmlessZero3Warning())


def follow_launcher() -> None:
    """Under terrascale's `accelerate launch` hook: ask the kernel for a SIGTERM (save, then exit) if the launcher
    dies, so that a SIGKILLed launcher never leaves training running orphaned. A stale variable (a process started
    by something else that inherited it) is ignored: the launcher must be our parent."""
    pid = os.environ.get(PID_ENV)
    if not pid or not sys.platform.startswith("linux") or str(os.getppid()) != pid:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def launcher_note() -> str | None:
    """Started by `accelerate launch` without the hook `launch/setup.sh` installs: say what that costs."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ and PID_ENV not in os.environ:
        return ("started by `accelerate launch` without terrascale's launcher hook (run `bash launch/setup.sh`, or "
                "`python -m trainer.launch_hook install` in this venv): a failing run will exit 1 with a traceback "
                "instead of its own exit code, and SIGTERM must be sent to the training process, not the launcher")
    return None
