"""Model families as data: how a Hugging Face config.json maps onto megamft's model section.

Every supported family is a decoder built by megatron-core's GPTModel; they
differ in the rows of these tables: norm kind, MLP kind, biases, per-head
query/key norms, positions, config key names, how checkpoints name and lay out
their tensors, and the defaults transformers assumes for keys a config.json
leaves out. Dispatch is by ``config.json["architectures"][0]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megamft.config import ModelConfig
from megamft.errors import UserError
from megamft.model.moe import DEEPSEEK_V2, MIXTRAL, QWEN2_MOE, QWEN3_MOE, MoeFamily, UnsupportedMoE
from megamft.model.rope import UnsupportedRope, hf_rope_scaling, rope_fields_from_hf
from megamft.sizing.architecture import head_dim


@dataclass(frozen=True)
class HfTensor:
    """How a family stores one megatron parameter (the default table names it as Llama does)."""

    names: tuple[str, ...]
    layout: str = "parts"
    """parts: one tensor per part, as the table's; fused: the parts concatenated along dim 0 in one tensor;
    megatron: megatron's own tensor (e.g. q/k/v interleaved per query group)."""


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
    activations: dict = field(default_factory=lambda: {"silu": "swiglu"})
    """hidden_act values the family's MLP takes -> model.mlp_activation; exports write the first that fits."""
    hidden_act_key: str = "hidden_act"
    normalization: str = "RMSNorm"
    linear_bias_key: str | None = None
    """config.json key that puts a bias on every linear layer (StarCoder2's use_bias)."""
    qk_layernorm: bool = False
    norm_epsilon_key: str = "rms_norm_eps"
    hf_defaults: dict = field(default_factory=dict)
    """What transformers assumes for keys a config.json may leave out, where megamft's default differs."""
    key_aliases: dict = field(default_factory=dict)
    """The family's name of a standard config key (StarCoder's n_embd for hidden_size), read and written."""
    multi_query_key: str | None = None
    """Boolean key meaning one key/value head (StarCoder's multi_query) instead of num_key_value_heads."""
    ffn_default_multiple: int | None = None
    """An unset intermediate_size means this many times hidden_size (StarCoder's n_inner: 4)."""
    fixed_keys: dict = field(default_factory=dict)
    """Keys the family supports with these values only (key -> allowed values); others are refused."""
    direct_keys: dict = field(default_factory=dict)
    """model field -> config.json key copied as it is, both ways (Gemma 2's soft-caps)."""
    model_fields: dict = field(default_factory=dict)
    """ModelConfig values every model of the family has (Gemma's zero-centered norms)."""
    head_dim_key: str | None = "head_dim"
    """Key of the attention head width (None: the family's head_dim means something else: DeepSeek-V2's is
    its RoPE width)."""
    hf_layer_prefix: str = "model.layers.{i}."
    hf_tensors: dict = field(default_factory=dict)
    """megatron parameter -> HfTensor, where the family stores it otherwise than the table says."""
    rope_type_aliases: dict = field(default_factory=dict)
    """rope_scaling types the family means otherwise (Phi-3's "su" and "yarn" are LongRoPE)."""
    window_switch_key: str | None = None
    """Key that must be true for sliding_window to apply (Qwen's use_sliding_window)."""
    window_layers_key: str | None = None
    """Key naming the first windowed layer when a config has no layer_types (Qwen's max_window_layers)."""
    per_layer_windows: bool = False
    """transformers reads layer_types (Qwen2, Qwen3, Gemma 2); otherwise a window applies to every layer."""
    alternate_windows: bool = False
    """Without layer_types, even layers (0, 2, ...) are windowed and odd ones global (Gemma 2)."""
    moe: MoeFamily | None = None
    """Mixture-of-experts config keys (None: a dense family)."""


_QWEN_WINDOWS = dict(
    window_switch_key="use_sliding_window",
    window_layers_key="max_window_layers",
    per_layer_windows=True,
)
# GemmaConfig reads a legacy hidden_act "gelu" as the tanh approximation; Gemma2Config's hidden_activation
# "gelu" is exact GELU.
_GEMMA = dict(
    hidden_act_key="hidden_act",
    activations={"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu_tanh"},
    hf_defaults={"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    fixed_keys={"use_bidirectional_attention": (None, False)},
    model_fields={"zero_centered_norm_weight": True, "scale_embeddings": True},
)
_STARCODER = {
    "embedding.word_embeddings.weight": HfTensor(("transformer.wte.weight",)),
    "decoder.final_layernorm.weight": HfTensor(("transformer.ln_f.weight",)),
    "decoder.final_layernorm.bias": HfTensor(("transformer.ln_f.bias",)),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": HfTensor(("ln_1.weight",)),
    "decoder.layers.self_attention.linear_qkv.layer_norm_bias": HfTensor(("ln_1.bias",)),
    # c_attn: [q; k; v] with one key/value head (multi_query), [q_h; k_h; v_h] per head otherwise: both are
    # megatron's per-query-group layout
    "decoder.layers.self_attention.linear_qkv.weight": HfTensor(
        ("attn.c_attn.weight",), "megatron"
    ),
    "decoder.layers.self_attention.linear_qkv.bias": HfTensor(("attn.c_attn.bias",), "megatron"),
    "decoder.layers.self_attention.linear_proj.weight": HfTensor(("attn.c_proj.weight",)),
    "decoder.layers.self_attention.linear_proj.bias": HfTensor(("attn.c_proj.bias",)),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": HfTensor(("ln_2.weight",)),
    "decoder.layers.mlp.linear_fc1.layer_norm_bias": HfTensor(("ln_2.bias",)),
}

FAMILIES = {
    family.hf_architecture: family
    for family in (
        # Llama 2, CodeLlama (rope_theta 1e6), DeepSeek-Coder (linear RoPE scaling), Llama 3.x (llama3 RoPE).
        Family(
            "llama",
            "LlamaForCausalLM",
            "llama",
            export_defaults={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
        ),
        Family(
            "mistral", "MistralForCausalLM", "mistral", export_defaults={"sliding_window": None}
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            qkv_bias=True,
            **_QWEN_WINDOWS,
            export_defaults={"use_sliding_window": False, "sliding_window": None},
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            "qwen3",
            qk_layernorm=True,
            **_QWEN_WINDOWS,
            hf_defaults={"head_dim": 128},
            export_defaults={
                "attention_bias": False,
                "use_sliding_window": False,
                "sliding_window": None,
            },
        ),
        Family(
            "starcoder2",
            "Starcoder2ForCausalLM",
            "starcoder2",
            activations={"gelu_pytorch_tanh": "gelu_tanh"},
            normalization="LayerNorm",
            linear_bias_key="use_bias",
            norm_epsilon_key="norm_epsilon",
            hf_defaults={"use_bias": True, "tie_word_embeddings": True},
            export_defaults={
                "residual_dropout": 0.0,
                "embedding_dropout": 0.0,
                "sliding_window": None,
            },
        ),
        # Phi-3 / Phi-3.5 mini and medium: Llama's layer with fused qkv_proj and gate_up_proj.
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "phi3",
            rope_type_aliases={"su": "longrope", "yarn": "longrope"},
            hf_defaults={"rms_norm_eps": 1e-5},
            hf_tensors={
                "decoder.layers.self_attention.linear_qkv.weight": HfTensor(
                    ("self_attn.qkv_proj.weight",), "fused"
                ),
                "decoder.layers.mlp.linear_fc1.weight": HfTensor(
                    ("mlp.gate_up_proj.weight",), "fused"
                ),
            },
            export_defaults={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "sliding_window": None},
        ),
        # Gemma and CodeGemma: GeGLU, (1 + weight) RMSNorm, embeddings scaled by sqrt(hidden), tied.
        Family("gemma", "GemmaForCausalLM", "gemma", **_GEMMA),
        # Gemma 2: Gemma plus norms after attention and MLP, soft-capping, every other layer windowed.
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "gemma2",
            **{
                **_GEMMA,
                "hidden_act_key": "hidden_activation",
                "activations": {"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu"},
                "hf_defaults": {
                    **_GEMMA["hf_defaults"],
                    "sliding_window": 4096,
                    "query_pre_attn_scalar": 256,
                    "attn_logit_softcapping": 50.0,
                    "final_logit_softcapping": 30.0,
                },
                "model_fields": {**_GEMMA["model_fields"], "post_sublayer_norms": True},
            },
            direct_keys={
                "attention_logit_softcap": "attn_logit_softcapping",
                "final_logit_softcap": "final_logit_softcapping",
                "attention_scale_dim": "query_pre_attn_scalar",
            },
            hf_tensors={
                "decoder.layers.mlp.linear_fc1.layer_norm_weight": HfTensor(
                    ("pre_feedforward_layernorm.weight",)
                )
            },
            per_layer_windows=True,
            alternate_windows=True,
        ),
        # StarCoder, StarCoderBase, SantaCoder: GPT-2's layer with multi-query attention, learned positions.
        Family(
            "gpt_bigcode",
            "GPTBigCodeForCausalLM",
            "gpt_bigcode",
            activations={
                "gelu_pytorch_tanh": "gelu_tanh",
                "gelu": "gelu",
                "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh",
            },
            hidden_act_key="activation_function",
            normalization="LayerNorm",
            norm_epsilon_key="layer_norm_epsilon",
            key_aliases={
                "num_hidden_layers": "n_layer",
                "hidden_size": "n_embd",
                "intermediate_size": "n_inner",
                "num_attention_heads": "n_head",
                "max_position_embeddings": "n_positions",
            },
            multi_query_key="multi_query",
            ffn_default_multiple=4,
            hf_defaults={
                "tie_word_embeddings": True,
                "layer_norm_epsilon": 1e-5,
                "n_positions": 1024,
            },
            fixed_keys={"add_cross_attention": (False,), "scale_attn_weights": (True,)},
            model_fields={"position_embedding": "learned_absolute", "add_bias_linear": True},
            hf_layer_prefix="transformer.h.{i}.",
            hf_tensors=_STARCODER,
            export_defaults={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            "mixtral",
            export_defaults={"sliding_window": None},
            moe=MIXTRAL,
        ),
        # DeepSeek-V2, V2-Lite, DeepSeek-Coder-V2(-Lite): multi-latent attention, shared experts, dense first layers.
        Family(
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
            "deepseek_v2",
            moe=DEEPSEEK_V2,
            head_dim_key=None,
            hf_defaults={
                "rms_norm_eps": 1e-6,
                "q_lora_rank": 1536,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "n_routed_experts": 64,
                "n_shared_experts": 2,
                "moe_intermediate_size": 1407,
            },
            direct_keys={
                "q_lora_rank": "q_lora_rank",
                "kv_lora_rank": "kv_lora_rank",
                "qk_head_dim": "qk_nope_head_dim",
                "qk_pos_emb_head_dim": "qk_rope_head_dim",
                "v_head_dim": "v_head_dim",
            },
            model_fields={"multi_latent_attention": True},
            # keys of DeepSeek's own code that transformers' DeepseekV2 does not read: supported as published
            fixed_keys={"scoring_func": ("softmax",), "moe_layer_freq": (1,)},
            export_defaults={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "qwen2_moe",
            qkv_bias=True,
            moe=QWEN2_MOE,
            **_QWEN_WINDOWS,
            export_defaults={"use_sliding_window": False, "sliding_window": None, "qkv_bias": True},
        ),
        # Qwen3-Coder-30B-A3B: Qwen3 attention (q/k norms, head_dim 128), 128 experts, no shared expert.
        # Its transformers model windows every layer, whatever layer_types a config.json carries.
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            qk_layernorm=True,
            moe=QWEN3_MOE,
            window_switch_key="use_sliding_window",
            export_defaults={
                "attention_bias": False,
                "use_sliding_window": False,
                "sliding_window": None,
            },
        ),
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


def _standard_keys(hf_config: dict, family: Family) -> dict:
    """The config with transformers' defaults, under the standard key names (num_hidden_layers, ...)."""
    hf = {**family.hf_defaults, **hf_config}
    hf.update(
        {standard: hf[alias] for standard, alias in family.key_aliases.items() if alias in hf}
    )
    if family.multi_query_key and "num_attention_heads" in hf:
        hf["num_key_value_heads"] = (
            1 if hf.get(family.multi_query_key, True) else hf["num_attention_heads"]
        )
    if family.ffn_default_multiple and not hf.get("intermediate_size") and "hidden_size" in hf:
        hf["intermediate_size"] = family.ffn_default_multiple * hf["hidden_size"]
    return hf


def _windows(hf_config: dict, family: Family) -> tuple[int | None, list[bool] | None]:
    """(sliding_window, the layers it applies to: None for every layer), as transformers reads them."""
    window = hf_config.get("sliding_window")
    if window is None or (
        family.window_switch_key and not hf_config.get(family.window_switch_key, False)
    ):
        return None, None  # Qwen configs carry a window size that is off unless use_sliding_window
    layers = hf_config["num_hidden_layers"]
    layer_types = hf_config.get("layer_types") if family.per_layer_windows else None
    if (
        layer_types is None and family.window_layers_key
    ):  # Qwen: windows from layer max_window_layers on
        first = hf_config.get(family.window_layers_key, 28)
        layer_types = [
            "sliding_attention" if i >= first else "full_attention" for i in range(layers)
        ]
    if layer_types is None and family.alternate_windows:
        layer_types = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ]
    windowed = (
        [kind == "sliding_attention" for kind in layer_types] if layer_types else [True] * layers
    )
    if not any(windowed):
        return None, None
    return int(window), None if all(windowed) else windowed


def _check_supported(hf_config: dict, family: Family, source: str) -> None:
    missing = [
        k
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
        )
        if k not in hf_config
    ]
    if missing:
        raise UnsupportedModel(f"{source}: missing required key(s) {missing}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise UnsupportedModel(
            f"{source}: attention_bias/mlp_bias on every projection is not supported "
            f"for {family.hf_architecture}"
        )
    act = hf_config.get(family.hidden_act_key, next(iter(family.activations)))
    if act not in family.activations:
        raise UnsupportedModel(
            f"{source}: {family.hidden_act_key} {act!r}; {family.hf_architecture} is supported "
            f"with {' or '.join(map(repr, family.activations))} only"
        )
    for key, allowed in family.fixed_keys.items():
        if hf_config.get(key, allowed[0]) not in allowed:
            raise UnsupportedModel(
                f"{source}: {key}={hf_config[key]!r} is not supported for "
                f"{family.hf_architecture} (supported: {', '.join(map(repr, allowed))})"
            )


def model_config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """megamft's model section for a Hugging Face config.json."""
    family = family_of(hf_config, source)
    hf_config = _standard_keys(hf_config, family)
    _check_supported(hf_config, family, source)
    values = {ours: hf_config[theirs] for theirs, ours in CONFIG_KEYS if theirs in hf_config}
    values.setdefault("num_query_groups", hf_config["num_attention_heads"])
    values.update(
        {
            ours: hf_config[theirs]
            for ours, theirs in family.direct_keys.items()
            if hf_config.get(theirs) is not None
        }
    )
    if family.norm_epsilon_key in hf_config:
        values["norm_epsilon"] = hf_config[family.norm_epsilon_key]
    head_dim = hf_config.get(family.head_dim_key) if family.head_dim_key else None
    if head_dim and head_dim * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        values["kv_channels"] = (
            head_dim  # Qwen3, Gemma 7B: heads x head_dim need not equal hidden_size
        )
    rope = {}
    try:
        if family.model_fields.get("position_embedding", "rope") == "rope":
            rope = rope_fields_from_hf(hf_config, source, family.rope_type_aliases)
    except UnsupportedRope as error:
        raise UnsupportedModel(str(error)) from None
    vocab = values["vocab_size"]
    if family.moe is not None:
        try:
            values.update(family.moe.model_fields(hf_config, source))
        except UnsupportedMoE as err:
            raise UnsupportedModel(str(err)) from None
    window, window_layers = _windows(hf_config, family)
    fields = dict(
        sliding_window=window,
        sliding_window_layers=window_layers,
        **values,
        **rope,
        add_qkv_bias=family.qkv_bias,
        add_bias_linear=bool(family.linear_bias_key and hf_config.get(family.linear_bias_key)),
        normalization=family.normalization,
        mlp_activation=family.activations[
            hf_config.get(family.hidden_act_key, next(iter(family.activations)))
        ],
        qk_layernorm=family.qk_layernorm,
        # Padded rows would take part in the softmax and change the loss against the original, so a
        # vocab that already splits over up to 8 TP ranks is not padded (128 where it adds no rows).
        make_vocab_size_divisible_by=128 if vocab % 128 == 0 or vocab % 8 else 1,
    )
    return ModelConfig(**{**fields, **family.model_fields})


def _hidden_act(model: ModelConfig, family: Family) -> str:
    for act, ours in family.activations.items():
        if ours == model.mlp_activation:
            return act
    raise UnsupportedModel(
        f"model.mlp_activation={model.mlp_activation} has no {family.hidden_act_key} in "
        f"{family.hf_architecture}"
    )


def _export_windows(model: ModelConfig, family: Family, config: dict) -> None:
    """sliding_window, layer_types and the family's switches for the model's windows."""
    windowed = model.sliding_window_layers or [bool(model.sliding_window)] * model.num_layers
    if model.sliding_window:
        config["sliding_window"] = model.sliding_window
    if family.window_switch_key:
        config[family.window_switch_key] = bool(model.sliding_window)
    if family.per_layer_windows:
        config["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windowed]
    elif model.sliding_window_layers is not None:
        raise UnsupportedModel(
            f"a window on some layers only (model.sliding_window_layers) has no config.json "
            f"form in {family.hf_architecture}, which windows every layer"
        )
    if family.window_layers_key:
        config[family.window_layers_key] = (
            windowed.index(True) if any(windowed) else model.num_layers
        )


def hf_config_from_model(model: ModelConfig, family: Family, dtype: str) -> dict:
    """A config.json that transformers loads for this model."""
    config = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        family.hidden_act_key: _hidden_act(model, family),
        "initializer_range": model.init_method_std,
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
        **family.export_defaults,
    }
    if model.position_embedding == "rope":
        config.update(rope_theta=model.rotary_base, rope_scaling=hf_rope_scaling(model))
    for theirs, ours in CONFIG_KEYS:
        config[theirs] = getattr(model, ours)
    config.update({theirs: getattr(model, ours) for ours, theirs in family.direct_keys.items()})
    if (
        isinstance(config.get("query_pre_attn_scalar"), float)
        and config["query_pre_attn_scalar"].is_integer()
    ):
        config["query_pre_attn_scalar"] = int(
            config["query_pre_attn_scalar"]
        )  # an int in Gemma2Config
    config[family.norm_epsilon_key] = model.norm_epsilon
    if family.linear_bias_key:
        config[family.linear_bias_key] = model.add_bias_linear
    if family.head_dim_key:
        config[family.head_dim_key] = head_dim(
            model
        )  # Gemma's config class assumes 256 where it is left out
    config["dtype"] = dtype  # transformers 5 reads "dtype", older versions "torch_dtype"
    _export_windows(model, family, config)
    config["num_key_value_heads"] = model.num_query_groups or model.num_attention_heads
    if family.multi_query_key:
        if config["num_key_value_heads"] not in (1, model.num_attention_heads):
            raise UnsupportedModel(
                f"{family.hf_architecture} has one key/value head or one per query head, not "
                f"model.num_query_groups={model.num_query_groups}"
            )
        config[family.multi_query_key] = config.pop("num_key_value_heads") == 1
    for standard, alias in family.key_aliases.items():
        config[alias] = config.pop(standard)
    if family.moe is not None:
        config.update(family.moe.hf_fields(model))
    return config
