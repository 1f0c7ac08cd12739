"""RoPE variants: read from a Hugging Face config, written back to one, applied to megatron's model.

Supported rope types, with the families whose published configs use them:
default (Llama 2/3.0, CodeLlama with theta 1e6, Mistral, Qwen2/2.5/3, StarCoder2, Gemma, Phi-3 4k),
linear (DeepSeek-Coder), llama3 (Llama 3.1/3.2/3.3) and yarn (Qwen2.5/Qwen3 long context,
DeepSeek-V2). Others (dynamic; longrope, Phi-3 128k and Phi-3.5) are refused by name.

YaRN follows transformers' ``_compute_yarn_parameters``: frequencies are
interpolated by the factor below ``beta_slow`` rotations over the original
context, kept above ``beta_fast``, ramped in between, and cos/sin are scaled by
an attention factor. megatron-core's YarnRotaryEmbedding computes the same
frequencies; its attention factor is get_mscale(factor, mscale) /
get_mscale(factor, mscale_all_dim), so megamft hands it the pair that gives
transformers' factor (``megatron_yarn_mscales``).
"""

from __future__ import annotations

import math

from megamft.config import ModelConfig
from megamft.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# rope_parameters key -> ModelConfig field, for the yarn values transformers reads.
_YARN_KEYS = {
    "beta_fast": "rope_yarn_beta_fast",
    "beta_slow": "rope_yarn_beta_slow",
    "mscale": "rope_yarn_mscale",
    "mscale_all_dim": "rope_yarn_mscale_all_dim",
    "attention_factor": "rope_yarn_attention_factor",
    "truncate": "rope_yarn_truncate",
}


class UnsupportedRope(UserError, ValueError):
    """A RoPE scaling megamft cannot reproduce exactly."""


def rope_fields_from_hf(hf_config: dict, source: str, aliases: dict | None = None) -> dict:
    """ModelConfig fields for the RoPE of a config.json (transformers 4 or 5 style keys).

    aliases: rope type names a family gives another meaning (Phi-3 calls LongRoPE "su" and "yarn").
    """
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or params
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = (aliases or {}).get(kind, kind)
    fields = {"rotary_base": float(theta)}
    if scaling.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedRope(
            f"{source}: partial_rotary_factor "
            f"{scaling.get('partial_rotary_factor', hf_config.get('partial_rotary_factor'))} "
            "(RoPE on part of each head) is not supported"
        )
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedRope(
            f"{source}: RoPE scaling type {kind!r} is not supported (rope_scaling's type; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); remove rope_scaling for contexts up to "
            "original_max_position_embeddings"
        )
    if kind == "default":
        return fields
    if kind == "yarn":
        return {**fields, **_yarn_fields(hf_config, scaling, source)}
    fields.update(rope_scaling_factor=float(scaling["factor"]), rope_scaling_type=kind)
    if kind == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in scaling]
        if missing:
            raise UnsupportedRope(f"{source}: llama3 RoPE scaling without {missing}")
        fields.update(
            rope_llama3_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_llama3_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_llama3_original_max_position_embeddings=int(
                scaling["original_max_position_embeddings"]
            ),
        )
    return fields


def _yarn_fields(hf_config: dict, scaling: dict, source: str) -> dict:
    """The rope_yarn_* fields, with transformers' defaults for the keys a config leaves out."""
    # transformers' priority: a top-level key (Phi-3 keeps it there), then rope_parameters', then the context
    original = (
        hf_config.get("original_max_position_embeddings")
        or scaling.get("original_max_position_embeddings")
        or hf_config.get("max_position_embeddings")
    )
    if not original:
        raise UnsupportedRope(
            f"{source}: yarn RoPE scaling without original_max_position_embeddings"
        )
    factor = (
        scaling.get("factor") or hf_config["max_position_embeddings"] / original
    )  # DeepSeek-V3's rule
    fields = dict(
        rope_scaling_type="yarn",
        rope_scaling_factor=float(factor),
        rope_yarn_original_max_position_embeddings=int(original),
    )
    for key, ours in _YARN_KEYS.items():
        if scaling.get(key) is not None:
            fields[ours] = bool(scaling[key]) if key == "truncate" else float(scaling[key])
    # transformers reads beta_fast/beta_slow with `or`: a 0 there means the default
    fields["rope_yarn_beta_fast"] = fields.get("rope_yarn_beta_fast") or 32.0
    fields["rope_yarn_beta_slow"] = fields.get("rope_yarn_beta_slow") or 1.0
    return fields


def hf_rope_scaling(model: ModelConfig) -> dict | None:
    """config.json's rope_scaling entry for the model (None: plain RoPE)."""
    if not model.rope_scaling_factor:
        return None
    if model.rope_scaling_type == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": model.rope_scaling_factor}
    if model.rope_scaling_type == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": model.rope_scaling_factor,
            "original_max_position_embeddings": model.rope_yarn_original_max_position_embeddings,
        }
        scaling.update(
            {
                key: getattr(model, ours)
                for key, ours in _YARN_KEYS.items()
                if getattr(model, ours) is not None
            }
        )
        return scaling
    return {
        "rope_type": "llama3",
        "factor": model.rope_scaling_factor,
        "low_freq_factor": model.rope_llama3_low_freq_factor,
        "high_freq_factor": model.rope_llama3_high_freq_factor,
        "original_max_position_embeddings": model.rope_llama3_original_max_position_embeddings,
    }


def linear_interpolation_factor(model: ModelConfig) -> float | None:
    """GPTModel's seq_len_interpolation_factor: the factor of linear scaling only."""
    return model.rope_scaling_factor if model.rope_scaling_type == "linear" else None


def is_yarn(model: ModelConfig) -> bool:
    return model.rope_scaling_type == "yarn" and bool(model.rope_scaling_factor)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended `factor` times (the YaRN paper's 0.1 ln s + 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(model: ModelConfig) -> float:
    """The scale transformers applies to cos and sin under YaRN."""
    if model.rope_yarn_attention_factor is not None:
        return model.rope_yarn_attention_factor
    factor, mscale, all_dim = (
        model.rope_scaling_factor,
        model.rope_yarn_mscale,
        model.rope_yarn_mscale_all_dim,
    )
    if mscale and all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, all_dim)
    return yarn_get_mscale(factor)


def megatron_yarn_mscales(model: ModelConfig) -> tuple[float, float]:
    """(mscale, mscale_all_dim) for megatron-core, whose attention factor is their get_mscale ratio.

    mscale_all_dim is the model's own (multi-latent attention also scales its softmax by it, as
    transformers' DeepseekV2 does); where transformers itself uses the ratio (both values set and
    non-zero) mscale passes through, otherwise it is solved for transformers' attention factor.
    """
    factor, mscale, all_dim = (
        model.rope_scaling_factor,
        model.rope_yarn_mscale,
        model.rope_yarn_mscale_all_dim,
    )
    all_dim = all_dim or 0.0
    if model.rope_yarn_attention_factor is None and mscale and all_dim:
        return mscale, all_dim
    target = yarn_attention_factor(model) * yarn_get_mscale(factor, all_dim)
    if (
        target == yarn_get_mscale(factor) or factor <= 1
    ):  # validation: no other factor with factor <= 1
        return 1.0, all_dim
    return (target - 1.0) / (0.1 * math.log(factor)), all_dim


def mla_rope_fields(model: ModelConfig) -> dict:
    """MLATransformerConfig's RoPE fields: plain or YaRN on the qk_pos_emb_head_dim part of each head."""
    if not is_yarn(model):
        # rotary_scaling_factor 1: MLA scales its softmax by get_mscale(rotary_scaling_factor, mscale_all_dim)
        return dict(
            rope_type="rope",
            rotary_base=model.rotary_base,
            rotary_scaling_factor=1.0,
            mscale_all_dim=0.0,
        )
    mscale, mscale_all_dim = megatron_yarn_mscales(model)
    return dict(
        rope_type="yarn",
        rotary_base=model.rotary_base,
        rotary_scaling_factor=model.rope_scaling_factor,
        original_max_position_embeddings=model.rope_yarn_original_max_position_embeddings,
        beta_fast=model.rope_yarn_beta_fast,
        beta_slow=model.rope_yarn_beta_slow,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


def megatron_yarn_attributes(model: ModelConfig) -> dict:
    """Attributes GPTModel(position_embedding_type='yarn') and megatron's attention read from the config.

    They are not TransformerConfig fields in megatron-core 0.16: GPTModel and
    attention.py read them with getattr/hasattr, as Megatron-Bridge's providers set them.
    """
    if not is_yarn(model) or model.multi_latent_attention:  # MLA reads mla_rope_fields instead
        return {}
    mscale, mscale_all_dim = megatron_yarn_mscales(model)
    return dict(
        yarn_rotary_scaling_factor=model.rope_scaling_factor,
        yarn_original_max_position_embeddings=model.rope_yarn_original_max_position_embeddings,
        yarn_beta_fast=model.rope_yarn_beta_fast,
        yarn_beta_slow=model.rope_yarn_beta_slow,
        yarn_mscale=mscale,
        yarn_mscale_all_dim=mscale_all_dim,
        yarn_correction_range_round_to_int=model.rope_yarn_truncate,
    )


def position_embedding_type(model: ModelConfig) -> str:
    """GPTModel's position_embedding_type (multi-latent attention makes its own RoPE: GPTModel's is 'rope',
    which GPTModel then leaves to it)."""
    return "yarn" if is_yarn(model) and not model.multi_latent_attention else "rope"


def apply_llama3_scaling(gpt_model, model: ModelConfig) -> None:
    """Scale a GPTModel's RoPE frequencies the llama3 way with the config's own values.

    megatron-core's RotaryEmbedding(rope_scaling=True) passes only the factor to
    its scaling function, whose other arguments default to Llama 3.1's values;
    a model with other values (or a change of those defaults) would be run with
    the wrong frequencies. So the model is built unscaled and its inverse
    frequencies rescaled here, passing all four values explicitly. Call before
    the first forward pass (megatron caches the frequencies per length).
    """
    if model.rope_scaling_type != "llama3" or not model.rope_scaling_factor:
        return
    rotary = gpt_model.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq,
        factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_llama3_low_freq_factor,
        high_freq_factor=model.rope_llama3_high_freq_factor,
        original_max_position_embeddings=model.rope_llama3_original_max_position_embeddings,
    )
