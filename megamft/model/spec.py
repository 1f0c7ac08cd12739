"""Layer specs: Transformer Engine's on GPUs that have it, the local spec otherwise."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamft.model.norm import MegamftRMSNorm


def local_block_spec(num_layers: int) -> TransformerBlockSubmodules:
    """megatron-core's local Llama layer (torch attention, SwiGLU) with our RMSNorm.

    Every norm, the final one included, is MegamftRMSNorm so that sequence
    parallel works without TE or apex.
    """
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = MegamftRMSNorm
    layer.submodules.pre_mlp_layernorm = MegamftRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=MegamftRMSNorm)


def transformer_engine_layer_spec() -> ModuleSpec:
    """Transformer Engine's fused layer (norm folded into the linear layers)."""
    return get_gpt_layer_with_transformer_engine_spec()


def gpt_layer_spec(num_layers_in_chunk: int, use_transformer_engine: bool):
    """The spec handed to GPTModel for one model chunk."""
    if use_transformer_engine:
        return transformer_engine_layer_spec()
    return local_block_spec(num_layers_in_chunk)
