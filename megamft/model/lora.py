"""LoRA adapters on megatron's tensor-parallel linear layers.

y = W x + (alpha / r) * B (A x), with W frozen.

  column-parallel (linear_qkv, linear_fc1; W is [out/TP, in]):
      A [r, in] replicated, B [out/TP, r] sharded like W.
  row-parallel (linear_proj, linear_fc2; W is [out, in/TP]):
      A [r, in/TP] sharded like W, B [out, r] replicated.

The only communication added is r-sized: a column layer all-reduces the
gradient of A x in backward (or all-gathers A x along the sequence under
sequence parallelism); a row layer sums A x over TP ranks (reduce-scatters it
along the sequence under sequence parallelism). Adapters are registered on the
base linear modules, so checkpoint keys of the base weights do not change, and
the sharded ones carry megatron's tensor-parallel attributes so checkpoints,
gradient norms and sequence-parallel gradient reduction treat them right.
"""

from __future__ import annotations

import types

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

COLUMN = ("linear_qkv", "linear_fc1")
ROW = ("linear_proj", "linear_fc2")


def _full_init(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """A layout-independent random A: the same full matrix on every TP layout, then sliced."""
    generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    return torch.randn(rows, cols, generator=generator) / rows


def _shard(param: torch.nn.Parameter, dim: int) -> torch.nn.Parameter:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def _column_forward(self, x):
    output, bias = self._lora_base_forward(x)
    u = torch.nn.functional.linear(x, self.lora_A)
    if self.config.sequence_parallel:
        u = gather_from_sequence_parallel_region(u)      # backward reduce-scatters: sums partial grads
    else:
        u = copy_to_tensor_model_parallel_region(u)      # backward all-reduces the r-sized gradient
    return output + self.lora_scale * torch.nn.functional.linear(u, self.lora_B), bias


def _row_forward(self, x):
    output, bias = self._lora_base_forward(x)
    u = torch.nn.functional.linear(x, self.lora_A)        # partial sum over this rank's input shard
    if self.config.sequence_parallel:
        u = reduce_scatter_to_sequence_parallel_region(u)
    else:
        u = reduce_from_tensor_model_parallel_region(u)
    return output + self.lora_scale * torch.nn.functional.linear(u, self.lora_B), bias


def _sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    sharded = self._lora_base_sharded_state_dict(prefix, sharded_offsets, metadata)
    column = self._lora_kind == "column"
    name, axis = ("lora_B", 0) if column else ("lora_A", 1)
    adapters = {"lora_A": self.lora_A, "lora_B": self.lora_B}
    sharded.update(make_sharded_tensors_for_checkpoint(adapters, prefix, {name: axis}, sharded_offsets))
    if self._lora_gated:  # fc1's rows are [gate; up] per rank, like its weight: same resharding
        key = f"{prefix}lora_B"
        sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
    return sharded


def attach(linear: torch.nn.Module, kind: str, name: str, rank: int, alpha: float, seed: int) -> None:
    """Give a megatron ColumnParallelLinear / RowParallelLinear a LoRA branch."""
    if hasattr(linear, "layer_norm_weight"):  # Transformer Engine's LayerNorm + linear in one module
        raise ValueError(f"LoRA cannot wrap {name}: its norm is fused into the linear, so the adapter would read "
                         "the un-normalized input; build the model with the local spec (see model/spec.py)")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    out_local, in_local = linear.weight.shape
    # Adapters live beside their base weight (the GPU), created there.
    like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    if kind == "column":
        a = _full_init(rank, in_local, seed, name)
        linear.lora_A = torch.nn.Parameter(a.to(**like))
        linear.lora_B = _shard(torch.nn.Parameter(torch.zeros(out_local, rank, **like)), 0)
        if linear.config.sequence_parallel:
            linear.lora_A.sequence_parallel = True  # its gradient comes from sequence shards
        linear.forward = types.MethodType(_column_forward, linear)
    else:
        a = _full_init(rank, in_local * tp, seed, name)[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        linear.lora_A = _shard(torch.nn.Parameter(a.contiguous().to(**like)), 1)
        linear.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, **like))
        if linear.config.sequence_parallel:
            linear.lora_B.sequence_parallel = True
        linear.forward = types.MethodType(_row_forward, linear)
    linear._lora_base_forward = types.MethodType(type(linear).forward, linear)
    linear._lora_base_sharded_state_dict = types.MethodType(type(linear).sharded_state_dict, linear)
    linear._lora_kind = kind
    linear._lora_gated = name.endswith("linear_fc1") and linear.config.gated_linear_unit
    linear.lora_scale = alpha / rank
    linear.sharded_state_dict = types.MethodType(_sharded_state_dict, linear)


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str], seed: int) -> int:
    """Attach adapters to every targeted linear of the model's layers and freeze everything else.

    Returns the number of trainable (adapter) parameters on this rank.
    """
    for param in model.parameters():
        param.requires_grad = False
    for layer in model.decoder.layers:
        for kind, names in (("column", COLUMN), ("row", ROW)):
            for name in names:
                if name in targets:
                    owner = layer.self_attention if name in ("linear_qkv", "linear_proj") else layer.mlp
                    attach(getattr(owner, name), kind, f"{layer.layer_number}.{name}", rank, alpha, seed)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight (per TP shard, no communication) and remove it."""
    for module in model.modules():
        if not hasattr(module, "lora_A"):
            continue
        module.weight += module.lora_scale * (module.lora_B.float() @ module.lora_A.float()).to(module.weight.dtype)
        del module.lora_A, module.lora_B
        module.forward = module._lora_base_forward
        del module.sharded_state_dict
