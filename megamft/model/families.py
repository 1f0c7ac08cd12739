"""Model families as data: how a Hugging Face config.json maps onto megamft's model section.

Every supported family is a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA);
they differ only in the rows of these tables. Dispatch is by
``config.json["architectures"][0]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megamft.config import ModelConfig
from megamft.model.moe import MIXTRAL, QWEN2_MOE, MoeFamily, UnsupportedMoE


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture."""

    name: str
    hf_architecture: str
    hf_model_type: str
    qkv_bias: bool = False
    """HF checkpoints carry q/k/v projection biases."""
    export_defaults: dict = field(default_factory=dict)
    """Extra keys written to an exported config.json."""
    moe: MoeFamily | None = None
    """Mixture-of-experts config keys (None: a dense family)."""


FAMILIES = {
    family.hf_architecture: family
    for family in (
        # Llama 2, CodeLlama (rope_theta 1e6) and DeepSeek-Coder (linear RoPE scaling).
        Family("llama", "LlamaForCausalLM", "llama",
               export_defaults={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
        Family("mistral", "MistralForCausalLM", "mistral", export_defaults={"sliding_window": None}),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True,
               export_defaults={"use_sliding_window": False, "sliding_window": None}),
        Family("mixtral", "MixtralForCausalLM", "mixtral", export_defaults={"sliding_window": None}, moe=MIXTRAL),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", qkv_bias=True, moe=QWEN2_MOE,
               export_defaults={"use_sliding_window": False, "sliding_window": None, "qkv_bias": True}),
    )
}

# (Hugging Face config key, megamft model field); identical for every family.
CONFIG_KEYS = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("rms_norm_eps", "norm_epsilon"),
    ("tie_word_embeddings", "tie_embeddings"),
)


class UnsupportedModel(ValueError):
    """The Hugging Face model cannot be represented; the message says why."""


def family_of(hf_config: dict, source: str = "config.json") -> Family:
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise UnsupportedModel(f"{source}: no 'architectures' entry; cannot tell the model family")
    if architectures[0] not in FAMILIES:
        raise UnsupportedModel(
            f"{source}: architecture {architectures[0]!r} is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[architectures[0]]


def _rope(hf_config: dict, source: str) -> tuple[float, float | None]:
    """(theta, linear scaling factor) from either transformers 4 or 5 style keys."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or params
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), float(scaling["factor"])
    raise UnsupportedModel(f"{source}: RoPE scaling type {kind!r} is not supported (default, linear)")


def model_config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """megamft's model section for a Hugging Face config.json."""
    family = family_of(hf_config, source)
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in hf_config]
    if missing:
        raise UnsupportedModel(f"{source}: missing required key(s) {missing}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise UnsupportedModel(f"{source}: attention_bias/mlp_bias on every projection is not supported")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"{source}: hidden_act {hf_config['hidden_act']!r}; only SwiGLU (silu) is supported")
    values = {ours: hf_config[theirs] for theirs, ours in CONFIG_KEYS if theirs in hf_config}
    values.setdefault("num_query_groups", hf_config["num_attention_heads"])
    head_dim = hf_config.get("head_dim")
    if head_dim and head_dim * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        raise UnsupportedModel(f"{source}: head_dim {head_dim} x heads != hidden_size is not supported")
    theta, scaling = _rope(hf_config, source)
    vocab = values["vocab_size"]
    window = hf_config.get("sliding_window")
    if family.moe is not None:
        try:
            values.update(family.moe.model_fields(hf_config, source))
        except UnsupportedMoE as err:
            raise UnsupportedModel(str(err)) from None
    if family.name in ("qwen2", "qwen2_moe") and not hf_config.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window size that is off unless use_sliding_window
    return ModelConfig(
        sliding_window=window,
        **values,
        rotary_base=theta,
        rope_scaling_factor=scaling,
        add_qkv_bias=family.qkv_bias,
        # No padding when the vocab already splits over up to 8 TP ranks: the padded
        # rows would take part in the softmax and change the loss against the original.
        make_vocab_size_divisible_by=1 if vocab % 8 == 0 else 128,
    )


def hf_config_from_model(model: ModelConfig, family: Family, dtype: str) -> dict:
    """A config.json that transformers loads for this model."""
    config = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        "hidden_act": "silu",
        "initializer_range": model.init_method_std,
        "rope_theta": model.rotary_base,
        "rope_scaling": (
            {"type": "linear", "rope_type": "linear", "factor": model.rope_scaling_factor}
            if model.rope_scaling_factor else None
        ),
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
        **family.export_defaults,
    }
    for theirs, ours in CONFIG_KEYS:
        config[theirs] = getattr(model, ours)
    config["dtype"] = dtype  # transformers 5 reads "dtype", older versions "torch_dtype"
    if model.sliding_window:
        config["sliding_window"] = model.sliding_window
        if family.name == "qwen2":
            config["use_sliding_window"] = True
    config["num_key_value_heads"] = model.num_query_groups or model.num_attention_heads
    if family.moe is not None:
        config.update(family.moe.hf_fields(model))
    return config
