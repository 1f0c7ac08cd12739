"""Targeted fixes for megatron-core 0.16.1 bugs that megamft's paths hit.

Each fix wraps one megatron function, names the bug, and is applied on CPU
and GPU alike (the bugs are not CPU-specific). Remove a fix once the pinned
megatron-core has it upstream.
"""

from __future__ import annotations

import functools

import torch

_applied = False


def apply() -> None:
    """Install every fix once per process."""
    global _applied
    if _applied:
        return
    _keep_torch_adam_step_on_reshardable_load()
    _load_dp_reshardable_state_without_autograd()
    _save_fully_reshardable_state_from_its_own_offsets()
    _define_te_general_gemm_without_transformer_engine()
    _checkpoint_manager_dies_with_its_trainer()
    _mla_without_transformer_engine()
    _applied = True


def _checkpoint_manager_dies_with_its_trainer() -> None:
    """megatron's checkpoint writer collects its results through a multiprocessing Manager, started with
    spawn at the first save (filesystem_async._get_write_results_queue); the manager ignores SIGINT and
    outlives a trainer killed with SIGKILL, orphaned. The same manager, told to die with its trainer."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    import megatron.core.dist_checkpointing.strategies.filesystem_async as filesystem_async

    from megamft.platform.signals import die_with_parent

    def results_queue():
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=die_with_parent)
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = results_queue


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


def _load_dp_reshardable_state_without_autograd() -> None:
    """Loading 'dp_reshardable' optimizer state into fp32 training raises RuntimeError: a view of a leaf
    Variable that requires grad is being used in an in-place operation.

    Without mixed precision the distributed optimizer's main parameters are views of
    the model's parameters, and load_parameter_state_from_dp_reshardable copies into
    them with autograd on (its fully_reshardable counterpart runs under no_grad).
    Loading is no computation to differentiate; it runs under no_grad here too.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.load_parameter_state_from_dp_reshardable = torch.no_grad()(
        DistributedOptimizer.load_parameter_state_from_dp_reshardable
    )


def _save_fully_reshardable_state_from_its_own_offsets() -> None:
    """Saving 'fully_reshardable' optimizer state of a gradient buffer split into several buckets (as
    ddp.overlap_grad_reduce does) writes every parameter past the first bucket from the wrong offset.

    get_parameter_state_dp_zero packs each buffer's buckets one after the other without their end
    padding; sharded_param_state_fully_reshardable slices that packing with param_index_map's offsets,
    which count the padding. Later parameters get a neighbour's values, the last ones zeros (with a
    warning); a resume trains from corrupted moments and master weights, silently. (Megatron-LM PR #5077
    fixes it upstream.) The function here sees offsets into the packing; the buffers keep their own.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    @functools.wraps(original)
    def sharded_state(self, *args, **kwargs):
        own = [buffer.param_index_map for buffer in self.buffers]
        try:
            for buffer in self.buffers:
                buffer.param_index_map = _offsets_without_bucket_padding(buffer)
            return original(self, *args, **kwargs)
        finally:
            for buffer, index_map in zip(self.buffers, own):
                buffer.param_index_map = index_map

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_state


def _offsets_without_bucket_padding(buffer) -> dict:
    """param_index_map with each (start, end) moved down by the end padding of the buckets before its own."""
    padding_before, padding = [], 0
    for bucket in buffer.buckets:
        padding_before.append(padding)
        padding += bucket.grad_data.numel() - bucket.numel_unpadded
    return {
        param: (start - padding_before[bucket_id], end - padding_before[bucket_id], bucket_id)
        for param, (start, end, bucket_id) in buffer.param_index_map.items()
    }


def _mla_without_transformer_engine() -> None:
    """Building MLASelfAttention without Transformer Engine raises TypeError: isinstance() arg 2 must be a type.

    multi_latent_attention sets HAVE_TE once megatron's own TE extension module imports,
    which it does without TE too, leaving TELinear a placeholder; the fp8 check in
    MultiLatentAttention.__init__ then calls isinstance(linear_proj, TELinear). Where
    megatron-core's layer specs found no TE (gpt_layer_specs.HAVE_TE), MLA is told so.
    """
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import multi_latent_attention

    if not gpt_layer_specs.HAVE_TE:
        multi_latent_attention.HAVE_TE = False


def _keep_torch_adam_step_on_reshardable_load() -> None:
    """Loading 'fully_reshardable' optimizer state with torch's Adam raises KeyError: 'step'.

    (Only with torch's Adam: see keeps_step_per_parameter.)

    Without Transformer Engine or apex, DistributedOptimizer uses torch.optim.Adam,
    whose per-parameter state holds 'step'. load_state_dict first restores that
    'step' from the checkpoint's param groups, then copies every state key from
    the resharded tensors, which never include 'step'. We pass the restored
    step through so the copy leaves it as it is. ('dp_reshardable' tensors do
    include a 'step': this rank's value from before the load, not the
    checkpoint's, which the copy would put back; the restored one wins there too.)

    The restored 'step' is also one tensor object shared by every parameter;
    torch's Adam increments each parameter's step in place, so the shared
    counter would advance once per parameter and skew Adam's bias correction
    after a resume. Each parameter gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if (
            keeps_step_per_parameter(self.optimizer)
            and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        ):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if state.get("step") is not None:
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
