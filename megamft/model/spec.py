"""Layer specs per attention backend: Transformer Engine's, torch's kernels, or megatron's local one."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamft.config import ConfigError, LoraConfig, MegamftConfig, ModelConfig
from megamft.model.attention import TorchCoreAttention
from megamft.model.backend_support import backend_problem
from megamft.model.lora_spec import NORM_KEYS, te_separate_norm_layer_spec, with_lora
from megamft.model.norm import MegamftRMSNorm, norm_class
from megamft.model.sublayer_norms import PostNormMLP, PostNormSelfAttention
from megamft.platform.device import TE_REBUILD_HINT
from megamft.sizing.architecture import is_gated, is_moe_layer

ATTENTION_BACKENDS = ("auto", "torch", "te", "local")


# Transformer Engine's MLA layer fuses these norms into the following linear and keeps input_layernorm apart;
# megatron's local MLA layer keeps them apart under their own names. One checkpoint layout for both:
_MLA_KEYS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def local_block_spec(
    num_layers: int,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    num_experts: int | None = None,
    torch_attention: bool = False,
    lora: LoraConfig | None = None,
    gated: bool = True,
    post_norms: bool = False,
    softcap: float | None = None,
) -> TransformerBlockSubmodules:
    """local_model_block_spec for a model of these parts (every layer alike; gated: SwiGLU MLPs, else GELU)."""
    model = ModelConfig(
        num_layers=num_layers,
        normalization=normalization,
        qk_layernorm=qk_layernorm,
        num_experts=num_experts,
        mlp_activation="swiglu" if gated else "gelu",
        post_sublayer_norms=post_norms,
        attention_logit_softcap=softcap,
    )
    return local_model_block_spec(model, range(num_layers), torch_attention, lora)


def local_model_block_spec(
    model: ModelConfig, layers: range, torch_attention: bool, lora: LoraConfig | None = None
) -> TransformerBlockSubmodules:
    """megatron-core's local layer (local linears, gated or GELU MLP) with megamft's norms, for `layers`.

    Every norm, the final one and Qwen3's per-head query/key norms included, is
    megamft's (RMSNorm or LayerNorm) so that sequence parallel works without
    TE or apex. An MoE layer's MLP is megatron's MoE layer with one MLP per
    expert (SequentialMLP); DeepSeek's first layers keep a dense MLP.
    torch_attention: core attention on torch's fused kernels
    (TorchCoreAttention, soft-capping its scores where the model asks) instead
    of megatron's DotProductAttention, which materializes [b, heads, s, s]
    scores. Gemma 2's attention and MLP normalize their output
    (sublayer_norms); multi-latent attention is megatron's MLASelfAttention.
    lora: LoRA-aware linears (model/lora_spec.py) when enabled.
    """
    kinds = {is_moe_layer(model, i) for i in layers}
    specs = {moe: _local_layer_spec(model, moe, torch_attention, lora) for moe in kinds}
    return TransformerBlockSubmodules(
        layer_specs=[specs[is_moe_layer(model, i)] for i in layers],
        layer_norm=norm_class(model.normalization),
    )


def _local_layer_spec(
    model: ModelConfig, moe: bool, torch_attention: bool, lora: LoraConfig | None
) -> ModuleSpec:
    norm = norm_class(model.normalization)
    mla = model.multi_latent_attention
    layer = copy.deepcopy(
        get_gpt_layer_local_spec(
            num_experts=model.num_experts if moe else None,
            moe_grouped_gemm=False,
            normalization=model.normalization,
            qk_layernorm=model.qk_layernorm or mla,
            multi_latent_attention=mla,
        )
    )  # MLA: its q and kv latent norms
    layer.submodules.input_layernorm = norm
    layer.submodules.pre_mlp_layernorm = norm
    attention = layer.submodules.self_attention.submodules
    if mla:
        attention.q_layernorm = attention.kv_layernorm = MegamftRMSNorm
        layer.submodules.sharded_state_dict_keys_map = dict(_MLA_KEYS)
    elif model.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = MegamftRMSNorm
    softcap = model.attention_logit_softcap
    if torch_attention:
        attention.core_attention = ModuleSpec(
            module=TorchCoreAttention, params={"softcap": softcap}
        )
    elif softcap:
        raise ConfigError(
            "attention soft-capping needs the torch attention backend (see megamft.model.softcap)"
        )
    if model.post_sublayer_norms:
        if moe or mla:
            raise ConfigError(
                "norms after attention and MLP are built for a dense layer's SelfAttention and MLP only"
            )
        layer.submodules.self_attention.module = PostNormSelfAttention
        layer.submodules.mlp.module = PostNormMLP
    if lora is not None and lora.enabled:
        if mla:
            raise ConfigError(
                "LoRA on multi-latent attention is not supported (lora.enabled=false)"
            )
        layer = with_lora(layer, lora, is_gated(model))
    return layer


def transformer_engine_layer_spec(
    qk_layernorm: bool = False,
    num_experts: int | None = None,
    lora: LoraConfig | None = None,
    gated: bool = True,
) -> ModuleSpec:
    """Transformer Engine's fused layer (norm folded into the linear layers); with LoRA, TE's layer whose
    norms are separate modules (lora_spec.te_separate_norm_layer_spec), the adapters on TE's linears.

    MoE layers use TE's grouped GEMM over the local experts; megatron saves its
    weights under SequentialMLP's keys, so checkpoints move between the two specs.
    """
    if lora is not None and lora.enabled:
        return te_separate_norm_layer_spec(lora, gated, qk_layernorm, num_experts)
    spec = get_gpt_layer_with_transformer_engine_spec(
        qk_layernorm=qk_layernorm, num_experts=num_experts, moe_grouped_gemm=bool(num_experts)
    )
    if num_experts:
        # An MoE layer keeps its MLP norm apart (TENorm), saved as pre_mlp_layernorm.*; the local spec and
        # the Hugging Face mapping name it mlp.linear_fc1.layer_norm_*, as TE's dense layer does.
        spec = copy.deepcopy(spec)
        spec.submodules.sharded_state_dict_keys_map = {
            **spec.submodules.sharded_state_dict_keys_map,
            "pre_mlp_layernorm.": NORM_KEYS["pre_mlp_layernorm."],
        }
    return spec


def resolve_attention_backend(
    requested: str, te_installed: bool, quantized_base: bool = False, te_problem: str | None = None
) -> str:
    """The backend `model.attention_backend` names on this machine: te, torch or local.

    auto: Transformer Engine where it is installed, else torch; torch for QLoRA
    (quantized_base), whose NF4 base computes in megatron's local linears.
    LoRA runs on TE's layer with its norms apart (transformer_engine_layer_spec).
    """
    if requested not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"model.attention_backend={requested!r}: choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if requested == "auto":
        return "te" if te_installed and not quantized_base else "torch"
    if requested == "te" and not te_installed:
        if te_problem:
            raise ConfigError(
                f"model.attention_backend=te: Transformer Engine is installed but does not import "
                f"({te_problem}); {TE_REBUILD_HINT}; or use model.attention_backend=torch"
            )
        raise ConfigError(
            "model.attention_backend=te needs Transformer Engine on a CUDA machine "
            "(see the README's cluster install); or use model.attention_backend=torch"
        )
    if requested == "te" and quantized_base:
        raise ConfigError(
            "model.attention_backend=te with lora.quantize_base: the NF4 base computes in megatron's "
            "local linears, not Transformer Engine's; use model.attention_backend=torch (or auto)"
        )
    return requested


def gpt_layer_spec(
    num_layers_in_chunk: int,
    backend: str,
    model: ModelConfig | None = None,
    lora: LoraConfig | None = None,
    first_layer: int = 0,
):
    """The spec handed to GPTModel for one model chunk holding layers first_layer, ... (backend: te, torch or
    local; norms, q/k norms, attention and experts from `model`; LoRA-aware linears from `lora`)."""
    model = model or ModelConfig()
    gated = is_gated(model)
    problem = backend_problem(model, backend)
    if problem:
        raise ConfigError(problem)
    if backend == "te":
        return transformer_engine_layer_spec(model.qk_layernorm, model.num_experts, lora, gated)
    layers = range(first_layer, first_layer + num_layers_in_chunk)
    return local_model_block_spec(model, layers, torch_attention=backend == "torch", lora=lora)


def attention_backend_for(
    cfg: MegamftConfig, te_installed: bool, te_problem: str | None = None
) -> str:
    """The backend this run uses (see resolve_attention_backend); auto takes torch for a model that only
    the torch backend computes (backend_support.backend_problem), and a named backend that would not compute the
    model is refused."""
    quantized = cfg.lora.enabled and cfg.lora.quantize_base is not None
    backend = resolve_attention_backend(
        cfg.model.attention_backend, te_installed, quantized, te_problem
    )
    if cfg.model.attention_backend == "auto" and backend_problem(cfg.model, backend):
        backend = "torch"
    problem = backend_problem(cfg.model, backend)
    if problem:
        raise ConfigError(problem)
    return backend
