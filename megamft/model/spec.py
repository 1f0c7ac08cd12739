"""Layer specs per attention backend: Transformer Engine's, torch's kernels, or megatron's local one."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamft.model.attention import TorchCoreAttention
from megamft.model.norm import MegamftRMSNorm

ATTENTION_BACKENDS = ("auto", "torch", "te", "local")


def local_block_spec(num_layers: int, torch_attention: bool = False) -> TransformerBlockSubmodules:
    """megatron-core's local Llama layer (SwiGLU, local linears) with our RMSNorm.

    Every norm, the final one included, is MegamftRMSNorm so that sequence
    parallel works without TE or apex. torch_attention: core attention on
    torch's fused kernels (TorchCoreAttention) instead of megatron's
    DotProductAttention, which materializes [b, heads, s, s] scores.
    """
    layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    layer.submodules.input_layernorm = MegamftRMSNorm
    layer.submodules.pre_mlp_layernorm = MegamftRMSNorm
    if torch_attention:
        layer.submodules.self_attention.submodules.core_attention = TorchCoreAttention
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=MegamftRMSNorm)


def transformer_engine_layer_spec() -> ModuleSpec:
    """Transformer Engine's fused layer (norm folded into the linear layers)."""
    return get_gpt_layer_with_transformer_engine_spec()


def resolve_attention_backend(requested: str, te_installed: bool, lora_enabled: bool) -> str:
    """The backend `model.attention_backend` names on this machine: te, torch or local.

    auto: Transformer Engine where it is installed, except for LoRA, else torch.
    TE's spec fuses the input norm into linear_qkv and linear_fc1
    (TELayerNormColumnParallelLinear): an adapter around those modules would
    read the un-normalized hidden state, so training and the merged export
    would silently differ from the model. The local layer keeps the norm
    apart, and its LoRA is tested against transformers.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={requested!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if requested == "auto":
        return "te" if te_installed and not lora_enabled else "torch"
    if requested == "te" and not te_installed:
        raise ValueError("model.attention_backend=te needs Transformer Engine on a CUDA machine "
                         "(pip install '.[gpu]'); or use model.attention_backend=torch")
    if requested == "te" and lora_enabled:
        raise ValueError("model.attention_backend=te with lora.enabled: TE's norm-fused linears would hand the "
                         "adapters un-normalized inputs; use model.attention_backend=torch (or auto)")
    return requested


def gpt_layer_spec(num_layers_in_chunk: int, backend: str):
    """The spec handed to GPTModel for one model chunk (backend: te, torch or local)."""
    if backend == "te":
        return transformer_engine_layer_spec()
    return local_block_spec(num_layers_in_chunk, torch_attention=backend == "torch")
