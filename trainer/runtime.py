"""Process environment that must be right before DeepSpeed or Accelerate are imported.

- No CUDA: DeepSpeed must use its CPU accelerator (`DS_ACCELERATOR=cpu`) and gloo.
- DeepSpeed JIT-compiles ops on first use (30-60 s each): cache them in a folder the venv owns.
- A plain `python launch/train.py` (no launcher) still needs the torch.distributed variables.
"""
from __future__ import annotations

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
