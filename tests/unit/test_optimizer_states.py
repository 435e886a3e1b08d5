"""memory.optimizer: which optimizer holds the trainable parameters' states, and the combinations refused.

- The key is closed (adamw | adamw_8bit | paged_adamw_8bit); 8-bit states with optim.name other than adamw is
  a config error naming both keys.
- run.build_optimizer builds bitsandbytes' AdamW8bit / PagedAdamW8bit, whose steps really keep uint8 moments
  on this CPU backend; under any DeepSpeed config the run's DeepSpeed check (memory.profiles.check_deepspeed, before
  the model is built) is a ConfigError naming memory.optimizer and the fix.
"""
from __future__ import annotations

import logging

import pytest
import torch

from trainer.config import build_experiment
from trainer.errors import ConfigError
from trainer.memory.profiles import check_deepspeed, profile_for
from trainer.train.run import build_optimizer


def _exp(**memory):
    return build_experiment({"memory": memory})


def test_default_is_torch_adamw():
    opt = build_optimizer(_exp(), [torch.nn.Parameter(torch.zeros(4))], None)
    assert type(opt) is torch.optim.AdamW


def test_unknown_value_is_refused():
    with pytest.raises(ConfigError, match="memory.optimizer"):
        _exp(optimizer="adam8")


def test_eight_bit_needs_adamw():
    with pytest.raises(ConfigError, match=r"memory.optimizer: 'adamw_8bit' .* optim.name is 'sgd': set optim.name: adamw"):
        build_experiment({"memory": {"optimizer": "adamw_8bit"}, "optim": {"name": "sgd"}})


@pytest.mark.parametrize("states,cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_eight_bit_states_step_on_this_backend(states, cls, caplog):
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64)  # 8192-element weight: above bitsandbytes' 4096-element 8-bit threshold
    exp = build_experiment({"memory": {"optimizer": states}, "optim": {"lr": 1e-2}})
    with caplog.at_level(logging.WARNING, logger="terrascale"):
        opt = build_optimizer(exp, list(layer.parameters()), None)
    assert type(opt).__name__ == cls
    assert ("paging needs CUDA" in caplog.text) == (states == "paged_adamw_8bit" and not torch.cuda.is_available())
    before = layer.weight.detach().clone()
    layer(torch.randn(8, 128)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, layer.weight)
    state = opt.state[layer.weight]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert opt.state[layer.bias]["state1"].dtype == torch.float32  # small tensors keep fp32 moments


@pytest.mark.parametrize("ds_config,owner", [({"zero_optimization": {"stage": 2}}, "ZeRO-2 partitions"),
                                             ({"zero_optimization": {"stage": 3},
                                               "optimizer": {"type": "AdamW"}}, "its own AdamW optimizer")])
def test_eight_bit_under_deepspeed_is_a_config_error(ds_config, owner):
    exp = _exp(optimizer="adamw_8bit", profile="zero3_offload_lora")
    with pytest.raises(ConfigError) as e:
        check_deepspeed(exp, profile_for(exp, exp.memory.profile), ds_config)
    (msg,) = e.value.issues
    assert msg.startswith("memory.optimizer: 'adamw_8bit' cannot run under DeepSpeed")
    assert owner in msg and "memory.profile zero3_offload_lora" in msg and "use memory.optimizer: adamw" in msg
