"""Model families as data: how a Hugging Face config.json maps onto megamft's model section.

Every supported family is a RoPE decoder built by megatron-core's GPTModel; they
differ in the rows of these tables: norm kind, MLP kind, biases, per-head
query/key norms, config key names and the defaults transformers assumes for
keys a config.json leaves out. Dispatch is by ``config.json["architectures"][0]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megamft.config import ModelConfig
from megamft.errors import UserError
from megamft.model.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE, MoeFamily, UnsupportedMoE
from megamft.model.rope import UnsupportedRope, hf_rope_scaling, rope_fields_from_hf


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
    hidden_act: str = "silu"
    """The one hidden_act the family's MLP kind reproduces."""
    normalization: str = "RMSNorm"
    mlp_activation: str = "swiglu"
    linear_bias_key: str | None = None
    """config.json key that puts a bias on every linear layer (StarCoder2's use_bias)."""
    qk_layernorm: bool = False
    norm_epsilon_key: str = "rms_norm_eps"
    hf_defaults: dict = field(default_factory=dict)
    """What transformers assumes for keys a config.json may leave out, where megamft's default differs."""
    window_switch_key: str | None = None
    """Key that must be true for sliding_window to apply (Qwen's use_sliding_window)."""
    window_layers_key: str | None = None
    """Key naming the first windowed layer when a config has no layer_types (Qwen's max_window_layers);
    None: a switched-on window applies to every layer (Qwen3-MoE)."""
    moe: MoeFamily | None = None
    """Mixture-of-experts config keys (None: a dense family)."""


FAMILIES = {
    family.hf_architecture: family
    for family in (
        # Llama 2, CodeLlama (rope_theta 1e6), DeepSeek-Coder (linear RoPE scaling), Llama 3.x (llama3 RoPE).
        Family("llama", "LlamaForCausalLM", "llama",
               export_defaults={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
        Family("mistral", "MistralForCausalLM", "mistral", export_defaults={"sliding_window": None}),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, window_switch_key="use_sliding_window",
               window_layers_key="max_window_layers",
               export_defaults={"use_sliding_window": False, "sliding_window": None}),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", qk_layernorm=True, window_switch_key="use_sliding_window",
               window_layers_key="max_window_layers", hf_defaults={"head_dim": 128},
               export_defaults={"attention_bias": False, "use_sliding_window": False, "sliding_window": None}),
        Family("starcoder2", "Starcoder2ForCausalLM", "starcoder2", hidden_act="gelu_pytorch_tanh",
               normalization="LayerNorm", mlp_activation="gelu_tanh", linear_bias_key="use_bias",
               norm_epsilon_key="norm_epsilon", hf_defaults={"use_bias": True, "tie_word_embeddings": True},
               export_defaults={"residual_dropout": 0.0, "embedding_dropout": 0.0, "sliding_window": None}),
        Family("mixtral", "MixtralForCausalLM", "mixtral", export_defaults={"sliding_window": None}, moe=MIXTRAL),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", qkv_bias=True, moe=QWEN2_MOE,
               window_switch_key="use_sliding_window", window_layers_key="max_window_layers",
               export_defaults={"use_sliding_window": False, "sliding_window": None, "qkv_bias": True}),
        # Qwen3-Coder-30B-A3B: Qwen3 attention (q/k norms, head_dim 128), 128 experts, no shared expert.
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", qk_layernorm=True, moe=QWEN3_MOE,
               window_switch_key="use_sliding_window",
               export_defaults={"attention_bias": False, "use_sliding_window": False, "sliding_window": None}),
    )
}

# (Hugging Face config key, megamft model field); the norm epsilon's key is per family.
CONFIG_KEYS = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("tie_word_embeddings", "tie_embeddings"),
)


class UnsupportedModel(UserError, ValueError):
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


def _sliding_window(hf_config: dict, family: Family, source: str) -> int | None:
    """The window every layer applies, None if none does; a window on some layers only is refused."""
    window = hf_config.get("sliding_window")
    if window is None or (family.window_switch_key and not hf_config.get(family.window_switch_key, False)):
        return None  # Qwen configs carry a window size that is off unless use_sliding_window
    layers = hf_config["num_hidden_layers"]
    # Qwen3-MoE's transformers model windows every layer, whatever layer_types a config.json carries.
    windows_every_layer = family.window_switch_key and not family.window_layers_key
    layer_types = None if windows_every_layer else hf_config.get("layer_types")
    if layer_types is None and family.window_layers_key:  # Qwen: windows from layer max_window_layers on
        first = hf_config.get(family.window_layers_key, 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    windowed = {kind == "sliding_attention" for kind in layer_types or ["sliding_attention"]}
    if windowed == {False}:
        return None
    if windowed == {True, False}:
        raise UnsupportedModel(f"{source}: sliding_window on some layers only (layer_types / max_window_layers) "
                               "is not supported; megamft applies one window to every layer")
    return int(window)


def _check_supported(hf_config: dict, family: Family, source: str) -> None:
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in hf_config]
    if missing:
        raise UnsupportedModel(f"{source}: missing required key(s) {missing}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise UnsupportedModel(f"{source}: attention_bias/mlp_bias on every projection is not supported "
                               f"for {family.hf_architecture}")
    act = hf_config.get("hidden_act", family.hidden_act)
    if act != family.hidden_act:
        raise UnsupportedModel(f"{source}: hidden_act {act!r}; {family.hf_architecture} is supported with "
                               f"{family.hidden_act!r} only")


def model_config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """megamft's model section for a Hugging Face config.json."""
    family = family_of(hf_config, source)
    hf_config = {**family.hf_defaults, **hf_config}
    _check_supported(hf_config, family, source)
    values = {ours: hf_config[theirs] for theirs, ours in CONFIG_KEYS if theirs in hf_config}
    values.setdefault("num_query_groups", hf_config["num_attention_heads"])
    if family.norm_epsilon_key in hf_config:
        values["norm_epsilon"] = hf_config[family.norm_epsilon_key]
    head_dim = hf_config.get("head_dim")
    if head_dim and head_dim * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        values["kv_channels"] = head_dim  # Qwen3: heads x head_dim need not equal hidden_size
    try:
        rope = rope_fields_from_hf(hf_config, source)
    except UnsupportedRope as error:
        raise UnsupportedModel(str(error)) from None
    vocab = values["vocab_size"]
    if family.moe is not None:
        try:
            values.update(family.moe.model_fields(hf_config, source))
        except UnsupportedMoE as err:
            raise UnsupportedModel(str(err)) from None
    return ModelConfig(
        sliding_window=_sliding_window(hf_config, family, source),
        **values,
        **rope,
        add_qkv_bias=family.qkv_bias,
        add_bias_linear=bool(family.linear_bias_key and hf_config.get(family.linear_bias_key)),
        normalization=family.normalization,
        mlp_activation=family.mlp_activation,
        qk_layernorm=family.qk_layernorm,
        # Padded rows would take part in the softmax and change the loss against the original, so a
        # vocab that already splits over up to 8 TP ranks is not padded (128 where it adds no rows).
        make_vocab_size_divisible_by=128 if vocab % 128 == 0 or vocab % 8 else 1,
    )


def hf_config_from_model(model: ModelConfig, family: Family, dtype: str) -> dict:
    """A config.json that transformers loads for this model."""
    config = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        "hidden_act": family.hidden_act,
        "initializer_range": model.init_method_std,
        "rope_theta": model.rotary_base,
        "rope_scaling": hf_rope_scaling(model),
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
        **family.export_defaults,
    }
    for theirs, ours in CONFIG_KEYS:
        config[theirs] = getattr(model, ours)
    config[family.norm_epsilon_key] = model.norm_epsilon
    if family.linear_bias_key:
        config[family.linear_bias_key] = model.add_bias_linear
    if model.kv_channels:
        config["head_dim"] = model.kv_channels
    config["dtype"] = dtype  # transformers 5 reads "dtype", older versions "torch_dtype"
    if model.sliding_window:
        config["sliding_window"] = model.sliding_window
    if family.window_switch_key:
        config[family.window_switch_key] = bool(model.sliding_window)
    if family.window_layers_key:
        config[family.window_layers_key] = 0
        config["layer_types"] = ["sliding_attention" if model.sliding_window else "full_attention"] * model.num_layers
    config["num_key_value_heads"] = model.num_query_groups or model.num_attention_heads
    if family.moe is not None:
        config.update(family.moe.hf_fields(model))
    return config
