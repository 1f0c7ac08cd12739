"""The MoE router's auxiliary losses: their scale over the global batch, their values for the log.

What the coefficients promise. Each micro-batch's router adds, per MoE layer,
``c_aux x load_balancing(mb) + c_z x z(mb)`` (megatron's micro-batch-level
"aux_loss" and its z-loss). megamft's objective is

    sum over tokens of w x task loss   +   sum over micro-batches m of (n_m / N) x c x aux_m

with n_m the token positions of micro-batch m and N those of the global batch:
the auxiliary terms are a token-weighted mean over the global batch, added
after the task weighting, whatever the loss mode, micro-batch size or DP split.

Why a rescale is needed. With ``calculate_per_token_loss`` megatron scales
each micro-batch's auxiliary gradient by its n_m, then divides every gradient
by K, the sum of the token counts the loss function returns: megamft returns
*learned* tokens (loss-masked), so megatron's auxiliary term would be
``(N / K) x c x mean aux``, larger the more prompt and padding a batch holds.
Before each step the coefficients handed to megatron are set to ``c x K / N``
(x TP under sequence parallel, see scale_to_global_batch), which makes the term
exactly the one above. Host arithmetic on counts the host
already has: no device work, no synchronization.

Reporting. megatron's tracker (moe_utils.save_to_aux_losses_tracker) adds
each layer's unscaled loss per micro-batch on the device. ``reduced`` turns it
into [load balancing, z] means over MoE layers, micro-batches and DP ranks,
still on the device, so train_step reads them with the step's one read.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

# megatron's tracker names -> the names megamft logs.
TRACKED = {"load_balancing_loss": "load_balancing", "z_loss": "z_loss"}


def scale_to_global_batch(
    config, coefficients: tuple[float, float], learned_tokens: float, routed_tokens: float
) -> None:
    """Give megatron the coefficients that make its auxiliary gradients `coefficients` x the token-weighted mean."""
    ratio = learned_tokens / routed_tokens if learned_tokens > 0 else 1.0
    if config.sequence_parallel:
        # Each TP rank routes 1/TP of the tokens and megatron scales its share by its own
        # token count, so the ranks' shares add up to 1/TP of the whole term.
        ratio *= parallel_state.get_tensor_model_parallel_world_size()
    aux, z = coefficients
    config.moe_aux_loss_coeff = aux * ratio
    config.moe_z_loss_coeff = z * ratio if z else None


def reduced(config, num_microbatches: int) -> torch.Tensor | None:
    """[load balancing, z] of this step, averaged as the module docstring says; None without a tracker.

    Each PP stage holds its own layers (summed over PP). With sequence parallel a TP
    rank routes a slice of the tokens: its load-balancing value is a partial sum
    (megatron reduces the expert counts, not the probabilities), so TP ranks add up;
    its z-loss is a mean over its slice, so they average. Without sequence parallel
    every TP rank holds the same values.
    """
    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return None
    tp_group = parallel_state.get_tensor_model_parallel_group()
    sequence_parallel = (
        config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1
    )
    values = []
    for name in TRACKED:
        entry = tracker.get(name)
        if entry is None:
            values.append(torch.full((), float("nan"), device=torch.cuda.current_device()))
            continue
        total = entry["values"].sum().double()
        torch.distributed.all_reduce(
            total, group=parallel_state.get_pipeline_model_parallel_group()
        )
        torch.distributed.all_reduce(
            total,
            group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            op=torch.distributed.ReduceOp.AVG,
        )
        if sequence_parallel:
            op = (
                torch.distributed.ReduceOp.SUM
                if name == "load_balancing_loss"
                else torch.distributed.ReduceOp.AVG
            )
            torch.distributed.all_reduce(total, group=tp_group, op=op)
        values.append(total / (num_microbatches * config.num_layers))  # every layer is an MoE layer
    clear_aux_losses_tracker()
    return torch.stack(values)
