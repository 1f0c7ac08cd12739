"""Build megatron-core GPTModel chunks from a megamft config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megamft.compat import megatron_fixes
from megamft.config import MegamftConfig
from megamft.model.attention_window import window_size
from megamft.model.moe import moe_transformer_fields
from megamft.model.rope import (
    apply_llama3_scaling,
    linear_interpolation_factor,
    megatron_yarn_attributes,
    mla_rope_fields,
    position_embedding_type,
)
from megamft.model.softcap import apply_final_logit_softcap
from megamft.model.spec import gpt_layer_spec
from megamft.sizing.architecture import is_gated

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' gelu_pytorch_tanh: StarCoder2's MLP, Gemma's gate)."""
    return F.gelu(x, approximate="tanh")


# model.mlp_activation -> megatron's activation_func (gated ones apply it to the gate half of fc1)
ACTIVATIONS = {
    "swiglu": F.silu,
    "geglu_tanh": gelu_tanh,
    "geglu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "gelu": F.gelu,
}


def transformer_config(
    cfg: MegamftConfig, fast: dict[str, bool] | None = None
) -> TransformerConfig:
    """megamft's model/parallel/train sections, the fast settings decided for this machine
    (model.fast_settings), then the `transformer:` pass-through."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = _DTYPES[t.precision]
    fields = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=is_gated(m),
        activation_func=ACTIVATIONS[m.mlp_activation],
        layernorm_zero_centered_gamma=m.zero_centered_norm_weight,
        softmax_scale=m.attention_scale_dim**-0.5 if m.attention_scale_dim else None,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        kv_channels=m.kv_channels,
        qk_layernorm=m.qk_layernorm,
        window_size=window_size(cfg),
        window_attn_skip_freq=[int(w) for w in m.sliding_window_layers]
        if m.sliding_window_layers
        else None,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        # Loss and gradients are divided by the token count of the whole global
        # batch, so they do not depend on how it is cut into micro-batches or DP ranks.
        calculate_per_token_loss=True,
        # Frees pipeline outputs once sent (as Megatron-LM trains) and makes the
        # schedule call the C++ autograd engine directly; under the CPU emulation
        # that keeps device redirection active inside backward (recompute).
        deallocate_pipeline_outputs=True,
    )
    fields.update(moe_transformer_fields(m, p))
    if p.pipeline_model_parallel_size == 2 and p.virtual_pipeline_model_parallel_size:
        # With two stages the previous and next rank are the same peer. Batched
        # p2p then posts "send grad, send activation" against "recv activation,
        # recv grad", and the two same-shaped tensors swap (seen under gloo:
        # wrong loss, no error). The unbatched path keeps the directions apart.
        fields["batch_p2p_comm"] = False
    if m.multi_latent_attention:
        fields.update(
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_head_dim=m.qk_head_dim,
            qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            **mla_rope_fields(m),
        )
    fields.update(fast or {})
    fields.update(cfg.transformer)
    config = (MLATransformerConfig if m.multi_latent_attention else TransformerConfig)(**fields)
    for name, value in megatron_yarn_attributes(m).items():
        setattr(config, name, value)
    return config


def build_model_chunks(
    cfg: MegamftConfig, config: TransformerConfig, vocab_size: int, attention_backend: str
) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (one without VPP).

    megamft's fixes of megatron-core bugs (megamft.compat.megatron_fixes) are installed first, before
    megatron builds, trains or saves anything of this process.
    """
    megatron_fixes.apply()
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    layers_per_chunk = cfg.model.num_layers // (
        cfg.parallel.pipeline_model_parallel_size * (vpp or 1)
    )
    chunks = []
    for stage in stages:
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=gpt_layer_spec(
                layers_per_chunk,
                attention_backend,
                cfg.model,
                cfg.lora,
                get_transformer_layer_offset(config, vp_stage=stage),
            ),
            vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type=(
                "learned_absolute"
                if cfg.model.position_embedding == "learned_absolute"
                else position_embedding_type(cfg.model)
            ),
            rotary_base=cfg.model.rotary_base,
            seq_len_interpolation_factor=linear_interpolation_factor(cfg.model),
            vp_stage=stage,
        )
        apply_llama3_scaling(chunk, cfg.model)
        apply_final_logit_softcap(chunk, cfg.model)
        if cfg.model.scale_embeddings:
            scale_embeddings(chunk)
        chunks.append(chunk)
    return chunks


def scale_embeddings(gpt_model) -> None:
    """Multiply a GPTModel chunk's input embeddings by sqrt(hidden), as Gemma does (a forward hook).

    The multiplier is rounded to the embeddings' dtype first, as transformers' Gemma rounds
    its `normalizer` (45.25 for hidden 2048 in bf16, not 45.2548...).
    """
    embedding = getattr(gpt_model, "embedding", None)
    if embedding is None:
        return

    def scale(module, inputs, output):
        # a host scalar rounded to the dtype: no device tensor is made per call
        return output * float(torch.tensor(module.config.hidden_size**0.5, dtype=output.dtype))

    embedding.register_forward_hook(scale)
