"""A model chunk as training holds it: the GPTModel inside megatron's DDP and Float16Module wrappers."""

from __future__ import annotations

import torch


def bare_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def gather_parameters(chunks) -> None:
    """Make every rank's full copy of the parameters current before they are read outside a forward pass.

    With ``ddp.overlap_param_gather`` the distributed optimizer updates only this
    rank's shard in ``step()``; the other shards arrive in the next forward pass's
    pre-hooks. A checkpoint written between the two would hold the previous step's
    weights for every shard but this rank's, so the gather is forced here, synchronously,
    as megatron's own disable_forward_pre_hook(param_sync=True) does around its saves; the
    next forward's pre-hooks then find the parameters gathered.
    """
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
