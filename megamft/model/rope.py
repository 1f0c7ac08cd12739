"""RoPE variants: read from a Hugging Face config, written back to one, applied to megatron's model.

Supported rope types, with the families whose published configs use them:
default (Llama 2/3.0, CodeLlama with theta 1e6, Mistral, Qwen2/2.5/3, StarCoder2),
linear (DeepSeek-Coder) and llama3 (Llama 3.1/3.2/3.3). Others (yarn, which
Qwen2.5/Qwen3 suggest for long context; dynamic; longrope) are refused by name.
"""

from __future__ import annotations

from megamft.config import ModelConfig
from megamft.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class UnsupportedRope(UserError, ValueError):
    """A RoPE scaling megamft cannot reproduce exactly."""


def rope_fields_from_hf(hf_config: dict, source: str) -> dict:
    """ModelConfig fields for the RoPE of a config.json (transformers 4 or 5 style keys)."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or params
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    fields = {"rotary_base": float(theta)}
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedRope(
            f"{source}: RoPE scaling type {kind!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); remove rope_scaling for contexts up to "
            "max_position_embeddings")
    if kind == "default":
        return fields
    fields.update(rope_scaling_factor=float(scaling["factor"]), rope_scaling_type=kind)
    if kind == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in scaling]
        if missing:
            raise UnsupportedRope(f"{source}: llama3 RoPE scaling without {missing}")
        fields.update(rope_llama3_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_llama3_high_freq_factor=float(scaling["high_freq_factor"]),
                      rope_llama3_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    return fields


def hf_rope_scaling(model: ModelConfig) -> dict | None:
    """config.json's rope_scaling entry for the model (None: plain RoPE)."""
    if not model.rope_scaling_factor:
        return None
    if model.rope_scaling_type == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": model.rope_scaling_factor}
    return {"rope_type": "llama3", "factor": model.rope_scaling_factor,
            "low_freq_factor": model.rope_llama3_low_freq_factor,
            "high_freq_factor": model.rope_llama3_high_freq_factor,
            "original_max_position_embeddings": model.rope_llama3_original_max_position_embeddings}


def linear_interpolation_factor(model: ModelConfig) -> float | None:
    """GPTModel's seq_len_interpolation_factor: the factor of linear scaling only."""
    return model.rope_scaling_factor if model.rope_scaling_type == "linear" else None


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
        rotary.inv_freq, factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_llama3_low_freq_factor,
        high_freq_factor=model.rope_llama3_high_freq_factor,
        original_max_position_embeddings=model.rope_llama3_original_max_position_embeddings)
