"""Layer specs: Transformer Engine's on GPUs that have it, the local spec otherwise."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamft.model.norm import MegamftRMSNorm


def local_block_spec(num_layers: int, num_experts: int | None = None) -> TransformerBlockSubmodules:
    """megatron-core's local Llama layer (torch attention, SwiGLU) with our RMSNorm.

    Every norm, the final one included, is MegamftRMSNorm so that sequence
    parallel works without TE or apex. With `num_experts`, the MLP is
    megatron's MoE layer with one SwiGLU MLP per expert (SequentialMLP).
    """
    layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    layer.submodules.input_layernorm = MegamftRMSNorm
    layer.submodules.pre_mlp_layernorm = MegamftRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=MegamftRMSNorm)


def transformer_engine_layer_spec(num_experts: int | None = None) -> ModuleSpec:
    """Transformer Engine's fused layer (norm folded into the linear layers).

    MoE layers use TE's grouped GEMM over the local experts; megatron saves its
    weights under SequentialMLP's keys, so checkpoints move between the two specs.
    """
    return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=bool(num_experts))


def use_transformer_engine(installed: bool, lora_enabled: bool) -> bool:
    """Transformer Engine's spec where it is installed, except for LoRA.

    TE's spec fuses the input norm into linear_qkv and linear_fc1
    (TELayerNormColumnParallelLinear): an adapter around those modules would
    read the un-normalized hidden state, so training and the merged export
    would silently differ from the model. The local spec keeps the norm
    apart, and its LoRA is tested against transformers; a TE spec with
    separate norms has not run anywhere yet, so it is not offered.
    """
    return installed and not lora_enabled


def gpt_layer_spec(num_layers_in_chunk: int, use_transformer_engine: bool, num_experts: int | None = None):
    """The spec handed to GPTModel for one model chunk."""
    if use_transformer_engine:
        return transformer_engine_layer_spec(num_experts)
    return local_block_spec(num_layers_in_chunk, num_experts)
