"""What the planner needs to measure a part only TerraTorch can build, handed in by its callers (the plan
command, the auto profile, sweeps, benchmarks, training): `terratorch_builders()` imports TerraTorch and
`trainer.model.models` only when a builder is called (11-17 s), and `quiet()` keeps library chatter out of the answer.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings


def terratorch_builders():
    """Builders the planner calls when it must measure a TerraTorch part (imports TerraTorch, 11–17 s)."""
    from trainer.plan.head import Builders

    def full_model(exp):
        from trainer.model.models import build_model

        return build_model(exp)

    def around(exp, backbone):
        from terratorch.models import EncoderDecoderFactory

        from trainer.model.registry import factory_kwargs, register_ours

        kwargs = {k: v for k, v in factory_kwargs(exp, register_ours()).items() if not k.startswith("backbone_")}
        necks = [dict(n) for n in exp.model.necks] or None
        return EncoderDecoderFactory().build_model(task=exp.task.kind.factory_task, backbone=backbone,
                                                   decoder=exp.model.decoder, necks=necks, **kwargs)

    return Builders(full_model=full_model, around=around)


@contextlib.contextmanager
def quiet():
    """Library chatter from building models (deprecation notes, "does not expose input embeddings") is not the
    answer the user asked for; errors still surface."""
    import torch
    from transformers.utils import logging as hf_logging

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # what DeepSpeed picks anyway without a GPU, minus its warning; the planner only uses its estimators
        os.environ["DS_ACCELERATOR"] = "cpu"
    # a profile whose step cannot run is reported in its row; the fake-tensor layer's traceback is noise
    quieter = {"DeepSpeed": logging.ERROR, "torch": logging.ERROR, "terratorch": logging.ERROR,
               "timm": logging.ERROR, "torch._subclasses.fake_tensor": logging.CRITICAL}
    levels = {n: logging.getLogger(n).level for n in quieter}
    hf_level = hf_logging.get_verbosity()
    for n, level in quieter.items():
        logging.getLogger(n).setLevel(level)
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        hf_logging.set_verbosity(hf_level)
