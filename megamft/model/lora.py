"""LoRA-aware tensor-parallel linear layers, built through megatron's layer spec.

y = W x + s B (A dropout(x)), W frozen, s = alpha / r (alpha / sqrt(r) with rsLoRA).

  column-parallel (linear_qkv, linear_fc1; W is [out/TP, in]):
      A [r, in] replicated, B [out/TP, r] sharded like W.
  row-parallel (linear_proj, linear_fc2; W is [out, in/TP]):
      A [r, in/TP] sharded like W, B [out, r] replicated.

The layers are subclasses of megatron's ColumnParallelLinear and
RowParallelLinear (lora_linear_class makes the same for Transformer Engine's
linears) with their constructors and forward signatures, so model/spec.py
names them in the layer spec and megatron builds them. The only communication
added is r-sized: a column layer all-reduces the gradient of A x in backward
(or all-gathers A x along the sequence under sequence parallelism); a row
layer sums A x over TP ranks (reduce-scatters it along the sequence). Routed
experts (expert TP 1) add none. Adapters are parameters of the linear module
(``...linear_qkv.lora_A``), so base keys do not change, and the sharded ones
carry megatron's tensor-parallel attributes so checkpoints, gradient norms and
sequence-parallel gradient reduction treat them right.

With ``quantize_base="nf4"`` (local linears only) the frozen weight is held
as bitsandbytes NF4 (model/nf4.py): ``weight`` holds the packed codes, and the
checkpoint still reads and writes the full-precision weight.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megamft.config import LoraConfig
from megamft.model.nf4 import nf4_linear, quantize_nf4

# In sharded_state_dict's metadata: build the adapters' entries only (adapter-only saves and loads),
# so that a quantized layer does not dequantize its weight for an entry that is dropped.
ADAPTERS_ONLY = "megamft_lora_adapters_only"


class _LoraLinear:
    """The adapter and the NF4 base shared by every LoRA-aware linear (a mixin before the megatron class)."""

    def _init_lora(
        self,
        kind: str,
        lora: LoraConfig | None,
        quantize_base: str | None,
        gated: bool,
        is_expert: bool,
        input_is_parallel: bool = True,
    ) -> None:
        if hasattr(
            self, "layer_norm_weight"
        ):  # Transformer Engine's LayerNorm + linear in one module
            raise ValueError(
                f"LoRA cannot wrap {type(self).__name__}: its norm is fused into the linear, so the "
                "adapter would read the un-normalized input; use a spec whose norms are separate "
                "modules (model/spec.py)"
            )
        self._lora_kind, self._lora_gated, self._lora_input_is_parallel = (
            kind,
            gated,
            input_is_parallel,
        )
        # megatron's group: Transformer Engine's wrappers keep it in _tp_group (TE's own tp_group is None
        # for experts), megatron's local linears in tp_group.
        self._lora_tp = getattr(self, "_tp_group", None) or self.tp_group
        tp = self._lora_tp.size()
        expert_parallel = self.config.expert_model_parallel_size > 1
        explicit_comm = is_expert and (
            tp > 1 or expert_parallel
        )  # the token dispatcher communicates
        if explicit_comm and tp > 1 and lora is not None:
            raise ValueError(
                "LoRA on routed experts needs parallel.expert_tensor_parallel_size=1: megatron does "
                "not reduce the gradients of adapter halves replicated over expert-TP ranks"
            )
        self._lora_comm = not explicit_comm and tp > 1
        self._lora_sequence_parallel = self._lora_comm and self.config.sequence_parallel
        self.lora_A = self.lora_B = None
        if lora is not None:
            self._add_adapter(lora, is_expert, expert_parallel)
        self.weight_nf4 = None
        if quantize_base:
            self._quantize_base()

    def _add_adapter(self, lora: LoraConfig, is_expert: bool, expert_parallel: bool) -> None:
        out_local, in_local = self.weight.shape
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        column = self._lora_kind == "column"
        # A starts at zero here; init_adapters gives it its layout-independent values once the model is built.
        self.lora_A = torch.nn.Parameter(torch.zeros(lora.rank, in_local, **like))
        self.lora_B = torch.nn.Parameter(
            torch.zeros(out_local if column else self.weight.shape[0], lora.rank, **like)
        )
        sharded, replicated = (self.lora_B, self.lora_A) if column else (self.lora_A, self.lora_B)
        sharded.tensor_model_parallel, sharded.partition_dim, sharded.partition_stride = (
            True,
            0 if column else 1,
            1,
        )
        if (
            is_expert
        ):  # like megatron's expert weights: whole on their rank, reduced over expert-DP with EP
            (
                replicated.tensor_model_parallel,
                replicated.partition_dim,
                replicated.partition_stride,
            ) = True, 0, 1
        elif self._lora_sequence_parallel:
            replicated.sequence_parallel = (
                True  # its gradient comes from sequence shards: summed over TP
            )
        for param in (self.lora_A, self.lora_B):
            param.allreduce = not (is_expert and expert_parallel)
        self.lora_scale, self.lora_dropout = lora.scale, lora.dropout

    # ------------------------------------------------------------------ the adapter branch

    def _dropped(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        """PEFT's lora_dropout on the adapter's input; a shard of a TP-split input draws from megatron's
        per-rank stream (as megatron's attention dropout does), whole inputs from the default one."""
        if not self.training or not self.lora_dropout:
            return x
        if sharded:
            with get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.lora_dropout, True)
        return torch.nn.functional.dropout(x, self.lora_dropout, True)

    def _column_delta(self, x: torch.Tensor, gather_output: bool = False) -> torch.Tensor:
        u = torch.nn.functional.linear(self._dropped(x, self._lora_sequence_parallel), self.lora_A)
        if self._lora_sequence_parallel:
            u = gather_from_sequence_parallel_region(
                u, group=self._lora_tp
            )  # backward reduce-scatters
        elif self._lora_comm:
            u = copy_to_tensor_model_parallel_region(
                u, group=self._lora_tp
            )  # backward all-reduces (r-sized)
        delta = self.lora_scale * torch.nn.functional.linear(u, self.lora_B)
        return (
            gather_from_tensor_model_parallel_region(delta, group=self._lora_tp)
            if gather_output
            else delta
        )

    def _row_delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self._lora_input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, group=self._lora_tp)
        u = torch.nn.functional.linear(
            self._dropped(x, self._lora_comm), self.lora_A
        )  # partial sum
        if self._lora_sequence_parallel:
            u = reduce_scatter_to_sequence_parallel_region(u, group=self._lora_tp)
        elif self._lora_comm:
            u = reduce_from_tensor_model_parallel_region(u, group=self._lora_tp)
        return self.lora_scale * torch.nn.functional.linear(u, self.lora_B)

    # ------------------------------------------------------------------ the NF4 base

    def _quantize_base(self, weight: torch.Tensor | None = None) -> None:
        """Hold `weight` (default: the layer's own) as NF4: `weight` becomes the packed 4-bit codes, a buffer
        megatron's forward hands to _forward_impl, and weight_nf4 their statistics."""
        weight = self.weight if weight is None else weight
        packed, self.weight_nf4 = quantize_nf4(weight)
        if isinstance(self._parameters.get("weight"), torch.nn.Parameter):
            del self.weight
            self.register_buffer("weight", packed, persistent=False)
        else:
            self.weight = packed

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.weight_nf4 is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return nf4_linear(input, self.weight, self.weight_nf4, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state_dict is this module's own copy (torch's Module.load_state_dict): taking the key is local
        full = state_dict.pop(f"{prefix}weight", None) if self.weight_nf4 is not None else None
        if full is not None:  # the full-precision base: quantize it
            self._quantize_base(full.to(device=self.weight.device, dtype=self.weight_nf4.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight this layer computes with (NF4 dequantized, or the weight itself)."""
        return (
            self.weight_nf4.dequantize(self.weight) if self.weight_nf4 is not None else self.weight
        )

    def base_nbytes(self) -> int:
        """Bytes the frozen base weight takes on this rank (NF4: codes and statistics)."""
        if self.weight_nf4 is None:
            return self.weight.numel() * self.weight.element_size()
        return self.weight.numel() * self.weight.element_size() + self.weight_nf4.nbytes()

    # ------------------------------------------------------------------ checkpoints and merging

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        column = self._lora_kind == "column"
        groups = {"tp_group": self._lora_tp, "dp_cp_group": metadata["dp_cp_group"]}
        if metadata.get(ADAPTERS_ONLY):
            sharded = {}
        else:
            sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            if self.weight_nf4 is not None:  # read (and written) as the full-precision base
                weight = {"weight": self.dequantized_weight()}
                sharded.update(
                    make_sharded_tensors_for_checkpoint(
                        weight, prefix, {"weight": 0 if column else 1}, sharded_offsets, **groups
                    )
                )
        if self.lora_A is None:
            return sharded
        adapters = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        axis = {"lora_B": 0} if column else {"lora_A": 1}
        sharded.update(
            make_sharded_tensors_for_checkpoint(adapters, prefix, axis, sharded_offsets, **groups)
        )
        if self._lora_gated:  # fc1's rows are [gate; up] per rank, like its weight: same resharding
            key = f"{prefix}lora_B"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded

    @torch.no_grad()
    def merge_adapter(self) -> None:
        """Fold the adapter into the base weight of this shard (no communication) and drop it; an NF4 base
        becomes its dequantized weight first."""
        if self.weight_nf4 is not None:
            weight = self.dequantized_weight()
            del self.weight
            self.weight_nf4 = None
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
        if (
            self.lora_A is not None
        ):  # summed in fp32, as the export merges (checkpoint/lora_export.py)
            delta = self.lora_scale * (self.lora_B.float() @ self.lora_A.float())
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            self.lora_A = self.lora_B = None


class LoraColumnParallelLinear(_LoraLinear, ColumnParallelLinear):
    """megatron's ColumnParallelLinear with an optional adapter and an optional NF4 base."""

    def __init__(
        self,
        input_size,
        output_size,
        *,
        lora: LoraConfig | None = None,
        quantize_base: str | None = None,
        gated: bool = False,
        **kwargs,
    ):
        super().__init__(input_size, output_size, **kwargs)
        self._init_lora("column", lora, quantize_base, gated, kwargs.get("is_expert", False))

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ):
        output, bias = super().forward(
            input_, weight=weight, runtime_gather_output=runtime_gather_output
        )
        if self.lora_A is None:
            return output, bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        return output + self._column_delta(input_, gather), bias


class LoraRowParallelLinear(_LoraLinear, RowParallelLinear):
    """megatron's RowParallelLinear with an optional adapter and an optional NF4 base."""

    def __init__(
        self,
        input_size,
        output_size,
        *,
        lora: LoraConfig | None = None,
        quantize_base: str | None = None,
        gated: bool = False,
        **kwargs,
    ):
        super().__init__(input_size, output_size, **kwargs)
        self._init_lora(
            "row",
            lora,
            quantize_base,
            gated,
            kwargs.get("is_expert", False),
            kwargs["input_is_parallel"],
        )

    def forward(self, input_: torch.Tensor):
        output, bias = super().forward(input_)
        if self.lora_A is None:
            return output, bias
        return output + self._row_delta(input_), bias


@functools.lru_cache(maxsize=None)
def lora_linear_class(base: type, kind: str) -> type:
    """A LoRA-aware subclass of a Transformer Engine linear wrapper (megatron's TEColumnParallelLinear or
    TERowParallelLinear, extensions/transformer_engine.py): same constructor, forward(x) -> (output, bias).

    Refuses a linear that owns its norm (TELayerNormColumnParallelLinear): the adapter would read the
    un-normalized input.
    """
    if kind not in ("column", "row"):
        raise ValueError(f"kind must be column or row, got {kind!r}")

    def __init__(self, *args, lora: LoraConfig | None = None, gated: bool = False, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._init_lora(kind, lora, None, gated, kwargs.get("is_expert", False))

    def forward(self, x):
        output, bias = base.forward(self, x)
        if self.lora_A is None:
            return output, bias
        return output + (self._column_delta(x) if kind == "column" else self._row_delta(x)), bias

    return type(
        f"Lora{base.__name__}",
        (_LoraLinear, base),
        {
            "__init__": __init__,
            "forward": forward,
            "__doc__": f"{base.__name__} with a LoRA adapter.",
        },
    )


def lora_modules(model: torch.nn.Module):
    """(seed name, module) of every LoRA-aware linear of the model's layers.

    The seed name is layout-independent: "{layer}.linear_qkv" (global layer number) for attention and
    dense MLPs, "{layer}.experts.{global expert}.linear_fc1", "{layer}.shared_experts.linear_fc1".
    """
    for layer in model.decoder.layers:
        for owner in (layer.self_attention, layer.mlp):
            for name, module in owner.named_modules():
                if isinstance(module, _LoraLinear):
                    yield f"{layer.layer_number}.{_seed_name(owner, name)}", module


def _seed_name(owner: torch.nn.Module, name: str) -> str:
    """linear_fc1, experts.{global index}.linear_fc1 or shared_experts.linear_fc1 for a module path."""
    parts = name.split(".")
    if parts[0] == "experts":  # experts.local_experts.{i}.linear_fc1
        experts = owner.experts
        first = experts.ep_group.rank() * experts.num_local_experts
        return f"experts.{first + int(parts[2])}.{parts[-1]}"
    return name


def _full_init(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """A layout-independent random A: the same full matrix on every TP layout, then sliced."""
    generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    return torch.randn(rows, cols, generator=generator) / rows


@torch.no_grad()
def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter's A its layout-independent start (B stays zero: the model starts as the base)."""
    for name, module in lora_modules(model):
        if module.lora_A is None:
            continue
        rank, local = module.lora_A.shape
        if module._lora_kind == "column":
            a = _full_init(rank, local, seed, name)
        else:
            tp, tp_rank = module._lora_tp.size(), module._lora_tp.rank()
            a = _full_init(rank, local * tp, seed, name)[:, tp_rank * local : (tp_rank + 1) * local]
        module.lora_A.copy_(a)


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> int:
    """Freeze everything but the adapters the spec built, and initialize them.

    Returns the number of trainable (adapter) parameters on this rank.
    """
    if len(model.decoder.layers) and not any(m.lora_A is not None for _, m in lora_modules(model)):
        raise ValueError(f"lora.targets {lora.targets} select no linear of this model's layers")
    for name, param in model.named_parameters():
        param.requires_grad = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
    init_adapters(model, lora.seed)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight (per TP shard, no communication) and remove it."""
    for _, module in lora_modules(model):
        module.merge_adapter()
