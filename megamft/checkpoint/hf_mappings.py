"""Which Hugging Face tensors make each megatron parameter, with their shapes.

A mapping's *kind* says how tensors combine: copy, vocab (padding rows), qkv
(megatron fuses q/k/v per query group) and gate_up (megatron's gated fc1 is
[gate; up]). Which mappings a model needs follows from its model section:
biases on every linear (StarCoder2), LayerNorm biases, a GELU MLP stored as
``mlp.c_fc``/``mlp.c_proj`` (StarCoder2, StarCoder), per-head query/key norms
(Qwen3), learned positions (StarCoder), norms after attention and MLP (Gemma 2).

The table names tensors as Llama does; a family renames what it stores
otherwise (``Family.hf_tensors``): under another layer prefix (StarCoder's
``transformer.h.{i}.``), as one tensor fused from the parts (Phi-3's
``qkv_proj`` = [q; k; v], ``gate_up_proj`` = [gate; up]), or as megatron's own
tensor (StarCoder's ``c_attn`` is laid out per query group as megatron's
linear_qkv is).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

from megamft.checkpoint import hf_moe
from megamft.config import ModelConfig
from megamft.sizing.architecture import head_dim, is_gated, is_moe_layer
from megamft.sizing.vocab import padded_vocab_size

if TYPE_CHECKING:
    from megamft.model.families import Family

HF_LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Dims:
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    positions: int
    value_dim: int
    """Width of a value head (MLA's v_head_dim; head_dim otherwise): linear_proj takes heads x value_dim."""
    q_lora: int | None = None
    kv_lora: int = 0
    qk_dim: int = 0
    """MLA: a query/key head's part without RoPE, and (rope_dim) its RoPE part."""
    rope_dim: int = 0

    @staticmethod
    def of(model: ModelConfig) -> "Dims":
        groups = model.num_query_groups or model.num_attention_heads
        padded = padded_vocab_size(model.vocab_size, 1, model.make_vocab_size_divisible_by)
        mla = model.multi_latent_attention
        return Dims(
            model.hidden_size,
            model.ffn_hidden_size,
            model.num_attention_heads,
            groups,
            head_dim(model),
            model.vocab_size,
            padded,
            model.max_position_embeddings,
            model.v_head_dim if mla else head_dim(model),
            model.q_lora_rank,
            model.kv_lora_rank,
            model.qk_head_dim,
            model.qk_pos_emb_head_dim,
        )


Shapes = Callable[[Dims], list[tuple[int, ...]]]


@dataclass(frozen=True)
class Mapping:
    """One megatron parameter and the Hugging Face tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: str
    per_layer: bool
    shapes: Shapes
    """Shape of each Hugging Face tensor (of each part, for a fused one)."""
    needed: Callable[[ModelConfig], bool] = lambda model: True
    layer_prefix: str = HF_LAYER
    """Prefix of a per-layer tensor's Hugging Face name."""
    fused: bool = False
    """The Hugging Face side is one tensor, the parts `shapes` gives concatenated along dim 0."""
    moe_layers: bool | None = None
    """None: in every layer; False: in the dense-MLP layers only (DeepSeek's first layers); True: MoE ones."""


def _hidden(d: Dims):
    return [(d.hidden,)]


def _qkv_weights(d: Dims):
    return [
        (d.heads * d.head_dim, d.hidden),
        (d.groups * d.head_dim, d.hidden),
        (d.groups * d.head_dim, d.hidden),
    ]


def _qkv_biases(d: Dims):
    return [(d.heads * d.head_dim,), (d.groups * d.head_dim,), (d.groups * d.head_dim,)]


def _dense_gated(m: ModelConfig) -> bool:
    # an MoE layer's MLPs are the experts' (hf_moe); DeepSeek's first layers are dense
    return is_gated(m) and (not m.num_experts or m.moe_first_dense_layers > 0)


def _gelu(m: ModelConfig) -> bool:
    return not is_gated(m)


def _layer_norm(m: ModelConfig) -> bool:
    return m.normalization == "LayerNorm"


def _mla(m: ModelConfig) -> bool:
    return m.multi_latent_attention


def _not_mla(m: ModelConfig) -> bool:
    return not m.multi_latent_attention


def _q_heads(d: Dims) -> int:
    return d.heads * (d.qk_dim + d.rope_dim)


_ATTN, _MLP = "decoder.layers.self_attention.", "decoder.layers.mlp."

MAPPINGS = (
    Mapping(
        "embedding.word_embeddings.weight",
        ("model.embed_tokens.weight",),
        "vocab",
        False,
        lambda d: [(d.vocab, d.hidden)],
    ),
    Mapping(
        "output_layer.weight",
        ("lm_head.weight",),
        "vocab",
        False,
        lambda d: [(d.vocab, d.hidden)],
        lambda m: not m.tie_embeddings,
    ),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", False, _hidden),
    Mapping(
        "decoder.final_layernorm.bias", ("model.norm.bias",), "copy", False, _hidden, _layer_norm
    ),
    Mapping(
        "embedding.position_embeddings.weight",
        ("transformer.wpe.weight",),
        "copy",
        False,
        lambda d: [(d.positions, d.hidden)],
        lambda m: m.position_embedding == "learned_absolute",
    ),
    # attention
    Mapping(
        _ATTN + "linear_qkv.layer_norm_weight",
        ("input_layernorm.weight",),
        "copy",
        True,
        _hidden,
        _not_mla,
    ),
    Mapping(
        _ATTN + "linear_qkv.layer_norm_bias",
        ("input_layernorm.bias",),
        "copy",
        True,
        _hidden,
        lambda m: _layer_norm(m) and _not_mla(m),
    ),
    Mapping(
        _ATTN + "linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
        True,
        _qkv_weights,
        _not_mla,
    ),
    Mapping(
        _ATTN + "linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
        True,
        _qkv_biases,
        lambda m: (m.add_qkv_bias or m.add_bias_linear) and _not_mla(m),
    ),
    # multi-latent attention (megatron's MLASelfAttention; its norms under Transformer Engine's fused names)
    Mapping(
        "decoder.layers.input_layernorm.weight",
        ("input_layernorm.weight",),
        "copy",
        True,
        _hidden,
        _mla,
    ),
    Mapping(
        _ATTN + "linear_q_proj.weight",
        ("self_attn.q_proj.weight",),
        "copy",
        True,
        lambda d: [(_q_heads(d), d.hidden)],
        lambda m: _mla(m) and m.q_lora_rank is None,
    ),
    Mapping(
        _ATTN + "linear_q_down_proj.weight",
        ("self_attn.q_a_proj.weight",),
        "copy",
        True,
        lambda d: [(d.q_lora, d.hidden)],
        lambda m: _mla(m) and m.q_lora_rank is not None,
    ),
    Mapping(
        _ATTN + "linear_q_up_proj.layer_norm_weight",
        ("self_attn.q_a_layernorm.weight",),
        "copy",
        True,
        lambda d: [(d.q_lora,)],
        lambda m: _mla(m) and m.q_lora_rank is not None,
    ),
    Mapping(
        _ATTN + "linear_q_up_proj.weight",
        ("self_attn.q_b_proj.weight",),
        "copy",
        True,
        lambda d: [(_q_heads(d), d.q_lora)],
        lambda m: _mla(m) and m.q_lora_rank is not None,
    ),
    Mapping(
        _ATTN + "linear_kv_down_proj.weight",
        ("self_attn.kv_a_proj_with_mqa.weight",),
        "copy",
        True,
        lambda d: [(d.kv_lora + d.rope_dim, d.hidden)],
        _mla,
    ),
    Mapping(
        _ATTN + "linear_kv_up_proj.layer_norm_weight",
        ("self_attn.kv_a_layernorm.weight",),
        "copy",
        True,
        lambda d: [(d.kv_lora,)],
        _mla,
    ),
    Mapping(
        _ATTN + "linear_kv_up_proj.weight",
        ("self_attn.kv_b_proj.weight",),
        "copy",
        True,
        lambda d: [(d.heads * (d.qk_dim + d.value_dim), d.kv_lora)],
        _mla,
    ),
    Mapping(
        _ATTN + "q_layernorm.weight",
        ("self_attn.q_norm.weight",),
        "copy",
        True,
        lambda d: [(d.head_dim,)],
        lambda m: m.qk_layernorm,
    ),
    Mapping(
        _ATTN + "k_layernorm.weight",
        ("self_attn.k_norm.weight",),
        "copy",
        True,
        lambda d: [(d.head_dim,)],
        lambda m: m.qk_layernorm,
    ),
    Mapping(
        _ATTN + "linear_proj.weight",
        ("self_attn.o_proj.weight",),
        "copy",
        True,
        lambda d: [(d.hidden, d.heads * d.value_dim)],
    ),
    Mapping(
        _ATTN + "linear_proj.bias",
        ("self_attn.o_proj.bias",),
        "copy",
        True,
        _hidden,
        lambda m: m.add_bias_linear,
    ),
    Mapping(
        _ATTN + "post_layernorm.weight",
        ("post_attention_layernorm.weight",),
        "copy",
        True,
        _hidden,
        lambda m: m.post_sublayer_norms,
    ),
    # MLP
    Mapping(
        _MLP + "linear_fc1.layer_norm_weight",
        ("post_attention_layernorm.weight",),
        "copy",
        True,
        _hidden,
    ),
    Mapping(
        _MLP + "linear_fc1.layer_norm_bias",
        ("post_attention_layernorm.bias",),
        "copy",
        True,
        _hidden,
        _layer_norm,
    ),
    Mapping(
        _MLP + "linear_fc1.weight",
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "gate_up",
        True,
        lambda d: [(d.ffn, d.hidden), (d.ffn, d.hidden)],
        _dense_gated,
        moe_layers=False,
    ),
    Mapping(
        _MLP + "linear_fc2.weight",
        ("mlp.down_proj.weight",),
        "copy",
        True,
        lambda d: [(d.hidden, d.ffn)],
        _dense_gated,
        moe_layers=False,
    ),
    Mapping(
        _MLP + "linear_fc1.weight",
        ("mlp.c_fc.weight",),
        "copy",
        True,
        lambda d: [(d.ffn, d.hidden)],
        _gelu,
    ),
    Mapping(
        _MLP + "linear_fc2.weight",
        ("mlp.c_proj.weight",),
        "copy",
        True,
        lambda d: [(d.hidden, d.ffn)],
        _gelu,
    ),
    Mapping(
        _MLP + "linear_fc1.bias",
        ("mlp.c_fc.bias",),
        "copy",
        True,
        lambda d: [(d.ffn,)],
        lambda m: m.add_bias_linear and _gelu(m),
    ),
    Mapping(
        _MLP + "linear_fc2.bias",
        ("mlp.c_proj.bias",),
        "copy",
        True,
        _hidden,
        lambda m: m.add_bias_linear and _gelu(m),
    ),
    Mapping(
        _MLP + "post_layernorm.weight",
        ("post_feedforward_layernorm.weight",),
        "copy",
        True,
        _hidden,
        lambda m: m.post_sublayer_norms,
    ),
)


def needed_mappings(
    model: ModelConfig, family: Family | None = None, fused_experts: bool = False
) -> list[Mapping]:
    """The model's mappings, under the family's names; MoE families add their experts' (per-expert or fused
    layout on disk)."""
    if model.add_bias_linear and is_gated(model):
        raise ValueError("biases on a gated MLP (mlp_bias) have no Hugging Face mapping in megamft")
    dense = [_as_stored(m, family) for m in MAPPINGS if m.needed(model)]
    experts = (
        hf_moe.expert_mappings(model, family.name, fused_experts) if family and family.moe else []
    )
    names = [n for m in dense + experts for n in m.hf]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"{family.hf_architecture if family else 'the default table'} names two megatron "
            f"parameters {clash}: this model section has no export in that family"
        )
    return dense + experts


def _as_stored(mapping: Mapping, family: Optional[Family]) -> Mapping:
    """The mapping under the family's tensor names and layout (Family.hf_tensors)."""
    if family is None:
        return mapping
    mapping = replace(mapping, layer_prefix=family.hf_layer_prefix)
    stored = family.hf_tensors.get(mapping.megatron)
    if stored is None:
        return mapping
    if stored.layout == "fused":
        return replace(mapping, hf=stored.names, fused=True)
    if stored.layout == "megatron":  # the stored tensor is megatron's own
        parts = mapping.shapes
        return replace(
            mapping,
            hf=stored.names,
            kind="copy",
            shapes=lambda d: [(sum(s[0] for s in parts(d)), *parts(d)[0][1:])],
        )
    return replace(mapping, hf=stored.names)


def hf_shapes(mapping: Mapping, d: Dims) -> list[tuple[int, ...]]:
    """Expected shape of each Hugging Face tensor of a mapping."""
    if mapping.kind == hf_moe.MOE_KIND:
        return list(mapping.hf_tensor_shapes)
    shapes = mapping.shapes(d)
    if mapping.fused:
        return [(sum(s[0] for s in shapes), *shapes[0][1:])]
    return shapes


def part_shapes(mapping: Mapping, d: Dims) -> list[tuple[int, ...]]:
    """Shape of each tensor the mapping's kind combines (the parts of a fused one)."""
    return mapping.shapes(d)


def hf_names(mapping: Mapping, layer: int | None) -> list[str]:
    return [
        mapping.layer_prefix.format(i=layer) + n if mapping.per_layer else n for n in mapping.hf
    ]


def layers_of(mapping, model: ModelConfig) -> list[int | None]:
    """The layers a mapping's tensors exist in ([None] for a tensor outside the layers)."""
    if not mapping.per_layer:
        return [None]
    if mapping.moe_layers is None:
        return list(range(model.num_layers))
    return [i for i in range(model.num_layers) if is_moe_layer(model, i) == mapping.moe_layers]


def stacked_layers(model: ModelConfig) -> bool:
    """megatron stores a layer tensor of all layers under one key on a leading layer axis, unless the layers
    differ (dense and MoE: megatron's non_homogeneous_layers), when each layer has keys of its own."""
    return not model.moe_first_dense_layers


def layer_key(mapping, layer: int | None, model: ModelConfig) -> str:
    """The global checkpoint key of a mapping's tensor in `layer`."""
    if layer is None or stacked_layers(model):
        return mapping.megatron
    return mapping.megatron.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)
