"""LoRA in megatron's layer specs: which class builds each linear of a layer, with which adapter.

A layer spec names a class (or a ModuleSpec with constructor params) for every
linear: linear_qkv and linear_proj in self_attention, linear_fc1 and linear_fc2
in the MLP, in each routed expert and in the shared expert. ``with_lora`` swaps
each for its LoRA-aware class (model/lora.py) with the adapter the config
selects for that path (LoraConfig.adapted) and, under QLoRA, an NF4 base; so the
layers are built as LoRA layers by megatron itself, whatever the backend.

``te_separate_norm_layer_spec`` is Transformer Engine's layer with its norms as
separate modules: TE fuses the input norm into linear_qkv and the MLP's norm
into linear_fc1 (TELayerNormColumnParallelLinear), where an adapter would read
the un-normalized input. Here they are TENorm followed by TEColumnParallelLinear,
so LoRA keeps TE's linears and TE's attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megamft.config import LoraConfig
from megamft.model.lora import LoraColumnParallelLinear, LoraRowParallelLinear, lora_linear_class

# Norm keys as the local spec and TE's fused linears save them: checkpoints move between the specs.
NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _linears(layer: ModuleSpec):
    """(path, owner submodules, attribute) of every linear of a layer spec (paths as in LORA_LINEARS)."""
    attention = layer.submodules.self_attention.submodules
    yield "self_attention.linear_qkv", attention, "linear_qkv"
    yield "self_attention.linear_proj", attention, "linear_proj"
    mlp = layer.submodules.mlp
    parts = [("mlp", mlp)]
    if hasattr(mlp.submodules, "experts"):  # an MoE layer: its experts and shared expert are MLPs
        parts = [
            ("mlp.experts", mlp.submodules.experts),
            ("mlp.shared_experts", mlp.submodules.shared_experts),
        ]
    for stem, spec in parts:
        if spec is not None and getattr(spec.submodules, "linear_fc1", None) is not None:
            yield f"{stem}.linear_fc1", spec.submodules, "linear_fc1"
            yield f"{stem}.linear_fc2", spec.submodules, "linear_fc2"


def with_lora(
    layer: ModuleSpec,
    lora: LoraConfig,
    gated: bool,
    column: type = LoraColumnParallelLinear,
    row: type = LoraRowParallelLinear,
) -> ModuleSpec:
    """A copy of `layer` whose linears are LoRA-aware: adapters where lora.targets select them, and an NF4
    base on every linear with lora.quantize_base. `gated`: the MLPs are SwiGLU (fc1 is [gate; up])."""
    layer = copy.deepcopy(layer)
    for path, owner, name in _linears(layer):
        params = {
            "lora": lora if lora.adapted(path) else None,
            "gated": gated and name == "linear_fc1",
        }
        if lora.quantize_base:
            params["quantize_base"] = lora.quantize_base
        if params["lora"] is None and "quantize_base" not in params:
            continue  # untouched: megatron's (or TE's) own class
        kind = "column" if name in ("linear_qkv", "linear_fc1") else "row"
        setattr(owner, name, ModuleSpec(module=column if kind == "column" else row, params=params))
    return layer


@dataclass(frozen=True)
class TEModules:
    """The Transformer Engine modules of a layer whose norms are separate; megatron's wrappers
    (extensions/transformer_engine.py) unless a test hands in stand-ins that follow their contracts."""

    norm: type
    column_linear: type
    row_linear: type
    core_attention: type
    qk_norm: type | None = None

    @staticmethod
    def megatron() -> "TEModules":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TEModules(
            TENorm,
            TEColumnParallelLinear,
            TERowParallelLinear,
            TEDotProductAttention,
            TESpecProvider().layer_norm(for_qk=True),
        )


def te_separate_norm_layer_spec(
    lora: LoraConfig,
    gated: bool,
    qk_layernorm: bool = False,
    num_experts: int | None = None,
    te: TEModules | None = None,
) -> ModuleSpec:
    """Transformer Engine's layer for LoRA: TENorm, then TE's column/row linears with adapters, TE's attention.

    The layer's structure is megatron's (TransformerLayer, SelfAttention, MLP or MoELayer); routed
    experts are SequentialMLP over TE's linears when they are adapted (TE's grouped GEMM has no per-expert
    linear to adapt), else TE's grouped MLP as in megatron's TE spec.
    """
    te = te or TEModules.megatron()
    if lora.quantize_base:
        raise ValueError(
            "lora.quantize_base needs megatron's local linears: Transformer Engine's compute from "
            "their own weights; use model.attention_backend=torch"
        )
    layer = copy.deepcopy(
        get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm
        )
    )
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = te.norm
    attention = sub.self_attention.submodules
    attention.core_attention = te.core_attention
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = te.qk_norm or te.norm
    for _, owner, name in _linears(layer):
        local = getattr(owner, name)
        setattr(owner, name, te.column_linear if local is ColumnParallelLinear else te.row_linear)
    if num_experts and not any(
        lora.adapted(p) for p in ("mlp.experts.linear_fc1", "mlp.experts.linear_fc2")
    ):
        grouped = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=True
        )
        sub.mlp.submodules.experts = grouped.submodules.mlp.submodules.experts
    sub.sharded_state_dict_keys_map = dict(NORM_KEYS)
    return with_lora(
        layer,
        lora,
        gated,
        lora_linear_class(te.column_linear, "column"),
        lora_linear_class(te.row_linear, "row"),
    )
