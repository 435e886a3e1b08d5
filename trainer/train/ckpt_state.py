"""Training state kept without pickle, and loading what must stay pickle without running code.

A job dir is data, and data can be planted: resume must never execute it. So
- the RNG states of each rank go to `rng_state_<rank>.safetensors` (tensors; the Python and NumPy generators as
  JSON in its metadata) instead of Accelerate's pickled `random_states_<rank>.pkl`, which is deleted after the
  save and never read;
- our own LR scheduler's state goes to `scheduler.json` (Accelerate's `register_for_checkpointing` would write a
  pickle and read it back with `weights_only=False`);
- progress (step, epoch, data position) is `progress.json` (trainer.train.checkpoint);
- the files that stay in torch's pickle format (Accelerate's `optimizer.bin`, DeepSpeed's `*_model_states.pt` and
  `*_optim_states.pt`, universal-checkpoint fragments) are read under `safe_loading()`: torch's weights-only
  unpickler, forced even where DeepSpeed asks for `weights_only=False`, with an allow-list of the few plain-data
  classes those files hold. A crafted file then fails to load (CheckpointError) instead of running.
"""
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import CheckpointError

SCHEDULER_FILE = "scheduler.json"
ACCELERATE_RNG = "random_states_{}.pkl"
RNG_FILE = "rng_state_{}.safetensors"
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _allowed_globals() -> list:
    """Plain-data classes found in Accelerate's and DeepSpeed's checkpoint files (each is rebuilt from numbers
    and strings; none runs code on load), read from the files themselves (tests/integration/test_no_unpickle).
    DeepSpeed's are only needed, and only imported, when DeepSpeed is in use."""
    import sys

    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = list(TORCH_SAFE_GLOBALS)
    if "deepspeed" in sys.modules:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 optimizer states

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    return allowed


@contextmanager
def safe_loading():
    """Every torch.load inside runs the weights-only unpickler with the allow-list above."""
    import torch

    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


def is_refused_pickle(err: BaseException) -> bool:
    """torch's weights-only unpickler refused a file (a global outside the allow-list, or a malformed pickle)."""
    import pickle

    return isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err)


def refuse_custom_pickles(directory: Path) -> None:
    """Accelerate's `load_state` unpickles `custom_checkpoint_<i>.pkl` with `weights_only=False`. terrascale
    registers nothing (scheduler.json instead), so such a file was written by an older terrascale or planted."""
    found = sorted(p.name for p in Path(directory).glob("custom_checkpoint_*.pkl"))
    if found:
        raise CheckpointError(f"{directory} holds {', '.join(found)}: a pickle, which can run code when read and which "
                              "terrascale neither writes nor reads; this checkpoint was written by an older terrascale "
                              "or altered. Resume from a checkpoint written by this version, or use a new "
                              "checkpoint.dir")


def refused_message(path: Path, err: BaseException) -> str:
    first = str(err).strip().splitlines()
    detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
    return (f"{path}: a file of this checkpoint is not plain tensor data and was not loaded (torch's weights-only "
            f"loader refused it: {detail.strip()[:200]}). terrascale never runs code from a job dir: if this "
            "checkpoint came from elsewhere or was altered, resume from another one (checkpoint.resume=<step dir>)")


def save_rng(directory: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(Path(directory) / RNG_FILE.format(rank)), metadata=meta)
    (Path(directory) / ACCELERATE_RNG.format(rank)).unlink(missing_ok=True)


def load_rng(directory: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors import safe_open

    path = Path(directory) / RNG_FILE.format(rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint has no random state for rank {rank}; resume with "
                              "the number of processes it was written with")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version, internal, gauss = json.loads(meta["python"])
        name, pos, has_gauss, cached = json.loads(meta["numpy"])
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch_cpu"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read the random state ({e}); the checkpoint is damaged") from e
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_scheduler(directory: Path, scheduler) -> None:
    state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # functions: rebuilt from config
    (Path(directory) / SCHEDULER_FILE).write_text(json.dumps(state, indent=1))


def load_scheduler(directory: Path, scheduler) -> None:
    path = Path(directory) / SCHEDULER_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the LR scheduler state ({e}); the checkpoint is damaged") from e
    state["lr_lambdas"] = [None] * len(state.get("base_lrs", []))
    scheduler.load_state_dict(state)
