"""Targeted fixes for megatron-core 0.16.1 bugs that megamft's paths hit.

Each fix wraps one megatron function, names the bug, and is applied on CPU
and GPU alike (the bugs are not CPU-specific). Remove a fix once the pinned
megatron-core has it upstream.
"""

from __future__ import annotations

import functools

_applied = False


def apply() -> None:
    """Install every fix once per process."""
    global _applied
    if _applied:
        return
    _keep_torch_adam_step_on_reshardable_load()
    _define_te_general_gemm_without_transformer_engine()
    _applied = True


def keeps_step_per_parameter(optimizer) -> bool:
    """Whether this inner optimizer counts steps in each parameter's state, as torch's Adam/AdamW do.

    Transformer Engine's and apex's fused Adam (which megatron-core uses whenever they import)
    count them in each param group instead, and TE's FusedAdam.state_dict raises KeyError on a
    state name outside its table (exp_avg, exp_avg_sq, master_param).
    """
    import torch

    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _define_te_general_gemm_without_transformer_engine() -> None:
    """The MoE router's fp32 gating raises NameError: name 'te_general_gemm' is not defined.

    moe_utils imports te_general_gemm only when Transformer Engine is installed, but
    RouterGatingLinearFunction tests `te_general_gemm is not None` either way (any
    moe_router_dtype). Defining the missing name as None takes megatron's own torch path.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _keep_torch_adam_step_on_reshardable_load() -> None:
    """Loading 'fully_reshardable' optimizer state with torch's Adam raises KeyError: 'step'.

    (Only with torch's Adam: see keeps_step_per_parameter.)

    Without Transformer Engine or apex, DistributedOptimizer uses torch.optim.Adam,
    whose per-parameter state holds 'step'. load_state_dict first restores that
    'step' from the checkpoint's param groups, then copies every state key from
    the resharded tensors, which never include 'step'. We pass the restored
    step through so the copy leaves it as it is.

    The restored 'step' is also one tensor object shared by every parameter;
    torch's Adam increments each parameter's step in place, so the shared
    counter would advance once per parameter and skew Adam's bias correction
    after a resume. Each parameter gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if ("step" not in tensors and keeps_step_per_parameter(self.optimizer)
                and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if state.get("step") is not None:
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
