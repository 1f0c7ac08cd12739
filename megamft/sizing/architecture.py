"""Widths derived from the model section, in one place for the converter, estimator and FLOP counter."""

from __future__ import annotations

from megamft.config import ModelConfig


def head_dim(m: ModelConfig) -> int:
    """Width of one attention head (megatron's kv_channels)."""
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def query_width(m: ModelConfig) -> int:
    """Output width of the query projection, input width of the attention output projection."""
    return m.num_attention_heads * head_dim(m)


def kv_width(m: ModelConfig) -> int:
    """Output width of the key (and of the value) projection."""
    return (m.num_query_groups or m.num_attention_heads) * head_dim(m)


GATED_ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu")


def is_gated(m: ModelConfig) -> bool:
    """A gated MLP: act(gate) * up, megatron's gated_linear_unit with fc1 = [gate; up]."""
    return m.mlp_activation in GATED_ACTIVATIONS


def mlp_matrices(m: ModelConfig) -> int:
    """hidden x ffn matrices per MLP: gate, up and down when gated; up and down otherwise."""
    return 3 if is_gated(m) else 2


def fc1_width(m: ModelConfig) -> int:
    """Output width of megatron's linear_fc1 ([gate; up] when gated)."""
    return (2 if is_gated(m) else 1) * m.ffn_hidden_size


def linear_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each of a dense layer's linear projections, by megatron's module name (LoRA's targets)."""
    h, q = m.hidden_size, query_width(m)
    return {
        "linear_qkv": (h, q + 2 * kv_width(m)),
        "linear_proj": (q, h),
        "linear_fc1": (h, fc1_width(m)),
        "linear_fc2": (m.ffn_hidden_size, h),
    }


def layer_linears(m: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(in, out, copies per layer) of every linear a layer has, by its path in megatron's layer (the paths
    lora.targets select, LORA_LINEARS): attention, then the dense MLP or the routed experts (copies: one per
    expert) and the shared expert."""
    h, q = m.hidden_size, query_width(m)
    linears = {
        "self_attention.linear_qkv": (h, q + 2 * kv_width(m), 1),
        "self_attention.linear_proj": (q, h, 1),
    }
    gate = 2 if m.mlp_activation == "swiglu" else 1
    if not m.num_experts:
        return {
            **linears,
            "mlp.linear_fc1": (h, fc1_width(m), 1),
            "mlp.linear_fc2": (m.ffn_hidden_size, h, 1),
        }
    expert = m.moe_ffn_hidden_size or m.ffn_hidden_size
    linears.update(
        {
            "mlp.experts.linear_fc1": (h, gate * expert, m.num_experts),
            "mlp.experts.linear_fc2": (expert, h, m.num_experts),
        }
    )
    shared = m.moe_shared_expert_intermediate_size
    if shared:
        linears.update(
            {
                "mlp.shared_experts.linear_fc1": (h, gate * shared, 1),
                "mlp.shared_experts.linear_fc2": (shared, h, 1),
            }
        )
    return linears


def is_column_parallel(path: str) -> bool:
    """linear_qkv and linear_fc1 split their output over TP ranks; linear_proj and linear_fc2 their input."""
    return path.endswith(("linear_qkv", "linear_fc1"))


def attention_parameters(m: ModelConfig) -> int:
    """Weights and biases of one layer's attention projections (its norms apart from the input norm's)."""
    h = m.hidden_size
    if m.multi_latent_attention:
        heads, rope = m.num_attention_heads, m.qk_pos_emb_head_dim
        q_out = heads * (m.qk_head_dim + rope)
        query = (
            h * q_out
            if m.q_lora_rank is None
            else h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * q_out
        )
        key_value = (
            h * (m.kv_lora_rank + rope)
            + m.kv_lora_rank
            + m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim)
        )
        return query + key_value + heads * m.v_head_dim * h + (h if m.add_bias_linear else 0)
    qkv_out, q = query_width(m) + 2 * kv_width(m), query_width(m)
    biases = qkv_out + h if m.add_bias_linear else (qkv_out if m.add_qkv_bias else 0)
    qk_norms = 2 * head_dim(m) if m.qk_layernorm else 0
    return h * qkv_out + q * h + biases + qk_norms


def layer_parameters(m: ModelConfig, moe_layer: bool | None = None) -> int:
    """Parameters of one transformer layer outside its routed experts (whole, before any parallel split).

    moe_layer: whether the layer has experts (default: whether the model has them; DeepSeek's first
    layers are dense).
    """
    h, f = m.hidden_size, m.ffn_hidden_size
    moe_layer = bool(m.num_experts) if moe_layer is None else moe_layer
    if (
        moe_layer
    ):  # the router, the shared expert and its gate; the experts: expert_layer_parameters
        mlp = m.num_experts * h + 3 * h * (m.moe_shared_expert_intermediate_size or 0)
        mlp += h if m.moe_shared_expert_gate else 0
    else:
        mlp = mlp_matrices(m) * h * f + (fc1_width(m) + h if m.add_bias_linear else 0)
    norms = (4 if m.post_sublayer_norms else 2) * h * (2 if m.normalization == "LayerNorm" else 1)
    return attention_parameters(m) + mlp + norms


def expert_layer_parameters(m: ModelConfig) -> int:
    """Parameters of one MoE layer's routed experts (0 for a dense model)."""
    return (
        3 * m.num_experts * m.hidden_size * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
        if m.num_experts
        else 0
    )


def is_moe_layer(model: ModelConfig, layer: int) -> bool:
    """Whether decoder layer `layer` (0-based) has routed experts: every layer of an MoE model after its
    model.moe_first_dense_layers dense ones (DeepSeek-V2's first_k_dense_replace)."""
    return bool(model.num_experts) and layer >= model.moe_first_dense_layers
