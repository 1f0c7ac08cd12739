"""Layer specs: Transformer Engine's on GPUs that have it, the local spec otherwise."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamft.config import ModelConfig
from megamft.model.norm import MegamftRMSNorm, norm_class


def local_block_spec(num_layers: int, normalization: str = "RMSNorm", qk_layernorm: bool = False,
                     num_experts: int | None = None) -> TransformerBlockSubmodules:
    """megatron-core's local layer (torch attention, SwiGLU or GELU MLP) with megamft's norms.

    Every norm, the final one and Qwen3's per-head query/key norms included, is
    megamft's (RMSNorm or LayerNorm) so that sequence parallel works without
    TE or apex. With `num_experts`, the MLP is megatron's MoE layer with one
    MLP per expert (SequentialMLP).
    """
    norm = norm_class(normalization)
    layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, normalization=normalization,
                                     qk_layernorm=qk_layernorm)
    layer.submodules.input_layernorm = norm
    layer.submodules.pre_mlp_layernorm = norm
    if qk_layernorm:
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = MegamftRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def transformer_engine_layer_spec(qk_layernorm: bool = False, num_experts: int | None = None) -> ModuleSpec:
    """Transformer Engine's fused layer (norm folded into the linear layers).

    MoE layers use TE's grouped GEMM over the local experts; megatron saves its
    weights under SequentialMLP's keys, so checkpoints move between the two specs.
    """
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, num_experts=num_experts,
                                                      moe_grouped_gemm=bool(num_experts))


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


def gpt_layer_spec(num_layers_in_chunk: int, use_transformer_engine: bool, model: ModelConfig | None = None):
    """The spec handed to GPTModel for one model chunk (norms, q/k norms and experts from `model`)."""
    model = model or ModelConfig()
    if use_transformer_engine:
        return transformer_engine_layer_spec(model.qk_layernorm, model.num_experts)
    return local_block_spec(num_layers_in_chunk, model.normalization, model.qk_layernorm, model.num_experts)
