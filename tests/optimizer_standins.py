"""CPU stand-ins for the fused Adam optimizers megatron-core picks when Transformer Engine or apex imports.

Neither library runs here (both need CUDA), yet megatron-core 0.16.1 switches its
whole optimizer path on them at import time (megatron/core/optimizer/__init__.py:
``Adam`` is TE's FusedAdam, else apex's, else torch's AdamW, and
``USING_PYTORCH_OPTIMIZER``; megatron/core/optimizer/distrib_optimizer.py:
``HAVE_APEX_OR_TE``, ``USING_TE_OPTIMIZER``, ``USING_APEX_OPTIMIZER``).
`install` sets those names as the imports would have, and the stand-ins follow
each library's contract as its source defines it, with the Adam arithmetic done
in plain torch:

- Transformer Engine, transformer_engine/pytorch/optimizers/fused_adam.py ``FusedAdam``:
  the step count lives in each param group (``group["step"]``, an int); per-parameter
  state holds only ``exp_avg``, ``exp_avg_sq`` (and ``master_param``); ``state_dict``
  passes every state name through ``get_unscaled_state``, which looks it up in
  ``name_to_dtype_map`` (those three names), so any other name raises ``KeyError``;
  ``load_state_dict`` re-sets each name through ``set_scaled_state`` (the same table,
  fp32 only).
- apex, apex/optimizers/fused_adam.py ``FusedAdam``: the step count lives in each
  param group; ``step`` creates ``exp_avg`` and ``exp_avg_sq`` for a parameter whose
  state is empty; ``state_dict`` and ``load_state_dict`` are torch's own.
"""

from __future__ import annotations

import torch


class _GroupStepAdam(torch.optim.Optimizer):
    """Adam/AdamW whose step count is per param group, as both fused optimizers keep it."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        *,
        adam_w_mode=True,
        bias_correction=True,
        **unused,
    ):
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "bias_correction": bias_correction,
            },
        )
        self.adam_w_mode = adam_w_mode

    def _initialize(self, param) -> None:
        self.state[param]["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
        self.state[param]["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            step = group["step"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if len(state) == 0:
                    self._initialize(param)
                grad = param.grad.float()
                if not self.adam_w_mode and group["weight_decay"]:
                    grad = grad + group["weight_decay"] * param
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if group["bias_correction"]:
                    m, v = m / (1 - beta1**step), v / (1 - beta2**step)
                if self.adam_w_mode and group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(-group["lr"] * m / (v.sqrt() + group["eps"]))


class TransformerEngineFusedAdam(_GroupStepAdam):
    """TE's FusedAdam contract: state names outside its dtype table raise KeyError on (de)serialization."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name_to_dtype_map = {
            "exp_avg": torch.float32,
            "exp_avg_sq": torch.float32,
            "master_param": torch.float32,
        }

    def initialize_state(self, param, store_param_remainders=False):
        self._initialize(param)

    def get_unscaled_state(self, param, state_name):
        self.name_to_dtype_map[state_name]  # TE's lookup: KeyError for any other name
        return self.state[param][state_name]

    def set_scaled_state(self, param, state_name, unscaled_state):
        assert unscaled_state.dtype == self.name_to_dtype_map[state_name]
        if state_name not in self.state[param]:
            self.state[param][state_name] = torch.empty_like(unscaled_state)
        self.state[param][state_name].copy_(unscaled_state)

    def state_dict(self):
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in state_dict["state"].items():
            state_dict["state"][index] = {
                name: self.get_unscaled_state(params[index], name) for name in entries
            }
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in state_dict["state"].items():
            self.state[params[index]] = {}
            for name, value in entries.items():
                self.set_scaled_state(params[index], name, value.float())


class ApexFusedAdam(_GroupStepAdam):
    """apex's FusedAdam contract: group-level step, torch's own state_dict."""


def install(kind: str) -> None:
    """Make megatron-core pick the stand-in as it picks the real optimizer when `kind` (te or apex) imports."""
    from megatron.core import optimizer
    from megatron.core.optimizer import distrib_optimizer

    standin = {"te": TransformerEngineFusedAdam, "apex": ApexFusedAdam}[kind]
    optimizer.Adam = standin
    optimizer.USING_PYTORCH_OPTIMIZER = False
    distrib_optimizer.Adam = standin
    distrib_optimizer.HAVE_APEX_OR_TE = True
    distrib_optimizer.USING_TE_OPTIMIZER = kind == "te"
    distrib_optimizer.USING_APEX_OPTIMIZER = kind == "apex"
