"""How a checkpoint is split over the ranks that write and read it.

Two choices decide what a save costs and where its checkpoint loads:

- The distributed optimizer's state format (``checkpoint.optimizer_format``).
  ``dp_sharded`` is megatron's ``dp_reshardable``: each rank writes its own
  shard of the optimizer state as it holds it (its buckets), with no gather
  (only the host copy every write makes); the checkpoint loads at the saving
  model-parallel layout (`optimizer_layout`) with any DP size.
  ``reshardable`` is megatron's ``fully_reshardable``: every DP rank gathers
  its DP group's whole optimizer state for its TP/PP shard onto the host and
  writes it per parameter; the checkpoint loads at any layout.
- megatron's fully parallel strategies over the DP group: a tensor that every
  DP rank holds (the weights) is written by one of them, chosen to balance
  bytes, and read by one of them and sent to the others.

The format is recorded in the checkpoint (megatron's content metadata) and the
model-parallel layout beside it, so loading reads the state back in the format
it was written in and refuses, naming the difference, a layout it cannot load at.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
    load_content_metadata,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from megamft.checkpoint.layout import CheckpointError
from megamft.config import MegamftConfig

SHARDING_TYPES = {"dp_sharded": "dp_reshardable", "reshardable": "fully_reshardable"}
"""checkpoint.optimizer_format -> megatron's distrib_optim_sharding_type."""
# What megamft wrote before it recorded the format: fully_reshardable state, no content metadata.
_UNRECORDED = {"distrib_optim_sharding_type": "fully_reshardable"}
LAYOUT_KEY = "optimizer_layout"  # in the checkpoint's common state: the layout that saved it
# A dp_reshardable bucket tensor (megatron prefixes chained_<i>. when there are several optimizers).
_DP_SHARDED_KEY = re.compile(r"(chained_\d+\.)?optimizer\.distributed\.")


def content_metadata(cfg: MegamftConfig) -> dict:
    """What a save passes to megatron's sharded_state_dict and stores as the checkpoint's content metadata."""
    return {"distrib_optim_sharding_type": SHARDING_TYPES[cfg.checkpoint.optimizer_format]}


def saved_metadata(common: dict) -> dict:
    """The content metadata a checkpoint was written with (its common state, as megatron reads it)."""
    return load_content_metadata(preloaded_state_dict=common) or dict(_UNRECORDED)


def optimizer_layout(chunks) -> dict:
    """What dp_reshardable optimizer state depends on, by config key: the distributed optimizer itself, the
    TP, PP, virtual-stage, EP and ETP split, and the bucket size megatron's DDP resolved (None: one bucket
    per buffer, as without ddp.overlap_grad_reduce; megatron's default grows with DP above 40)."""
    ddp = getattr(chunks[0], "ddp_config", None)
    return {
        "optimizer.use_distributed_optimizer": ddp.use_distributed_optimizer
        if ddp is not None
        else None,
        "parallel.tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "parallel.pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "parallel.virtual_pipeline_model_parallel_size": len(chunks) if len(chunks) > 1 else None,
        "parallel.expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "parallel.expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
        "ddp.bucket_size": ddp.bucket_size if ddp is not None else None,
    }


def check_loadable_at(path: Path, stored_keys, common: dict, layout: dict) -> None:
    """Refuse, naming each difference and what to do, DP-sharded optimizer state saved at another
    model-parallel layout (megatron would fail deep inside, or on a missing key named like a model mismatch).

    Decided by the tensors the checkpoint holds: a run without the distributed optimizer writes per-parameter
    state in either format, which loads anywhere. Every rank reaches the same answer, so all raise together.
    """
    if not any(_DP_SHARDED_KEY.match(key) for key in stored_keys):
        return
    saved = common.get(LAYOUT_KEY, {})
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
        for key, value in layout.items()
        if saved.get(key) != value
    ]
    if not differences:
        return
    raise CheckpointError(
        f"{path} holds DP-sharded optimizer state (checkpoint.optimizer_format=dp_sharded), which loads only "
        f"at the model-parallel layout that saved it (any DP size); differs in: {'; '.join(differences)}. "
        "Resume at the checkpoint's layout (its megamft_config.json), or resume there once with "
        "checkpoint.optimizer_format=reshardable and save (a reshardable checkpoint loads at any layout), "
        "or set checkpoint.load_optimizer=false to start a new fine-tune from its weights"
    )


def save_strategy():
    """megatron's torch_dist writer, its work spread over the DP group (sync and async saves alike)."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())


def load_strategy(path: Path):
    """megatron's reader for `path`, each tensor every DP rank needs read by one rank and sent to the others."""
    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(path)), _dp_group()
    )


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)
