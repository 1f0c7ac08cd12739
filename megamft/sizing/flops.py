"""Model FLOPs and TFLOP/s per device (the numerator of MFU), counted from the config's shapes."""

from __future__ import annotations

from megamft.config import MegamftConfig
from megamft.sizing.architecture import layer_linears, linear_shapes, mlp_matrices, query_width


def model_flops(cfg: MegamftConfig, vocab_size: int, document_lengths: list[int]) -> float:
    """Model FLOPs of one training pass over documents of these lengths: MFU's numerator.

    2 FLOPs per multiply-add; matmuls: QKV (grouped KV), attention output, the MLP (SwiGLU's
    three matrices, GELU's two; for MoE the router, the top-k experts and the shared expert),
    the output layer. Attention counts only the pairs it needs, the causal ones inside each
    document (d (d + 1) / 2 for d tokens, scores and values), as flash kernels compute them
    (megatron's local attention computes all s x s scores of a row). With LoRA the
    frozen weights take no weight gradient (forward and input gradient: x2), the adapters
    x3. Activation recompute is extra hardware work, not model work, and is not counted.
    """
    m = cfg.model
    tokens = sum(document_lengths)
    shapes = linear_shapes(m)
    attention_macs = sum(
        fan_in * fan_out for fan_in, fan_out in (shapes["linear_qkv"], shapes["linear_proj"])
    )
    weight_macs = (
        m.num_layers * (attention_macs + _mlp_multiply_adds(m)) + m.hidden_size * vocab_size
    )
    pairs = sum(d * (d + 1) // 2 for d in document_lengths)
    attention = (
        3 * m.num_layers * 2 * 2 * query_width(m) * pairs
    )  # scores and values, forward + backward
    if not cfg.lora.enabled:
        return float(3 * 2 * weight_macs * tokens + attention)
    # An adapter is A [r, in] then B [out, r]: r x (in + out) multiply-adds per token (routed experts':
    # per chosen expert).
    adapter_macs = (
        m.num_layers
        * cfg.lora.rank
        * sum(
            (fan_in + fan_out) * (m.moe_router_topk if path.startswith("mlp.experts.") else 1)
            for path, (fan_in, fan_out, _) in layer_linears(m).items()
            if cfg.lora.adapted(path)
        )
    )
    return float(2 * 2 * weight_macs * tokens + 3 * 2 * adapter_macs * tokens + attention)


def _mlp_multiply_adds(m) -> int:
    """Multiply-adds of one token through one layer's MLP: the dense MLP, or the router, the top-k
    routed experts and the shared expert of an MoE layer."""
    h = m.hidden_size
    if not m.num_experts:
        return mlp_matrices(m) * h * m.ffn_hidden_size
    routed = m.moe_router_topk * 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0) + (
        h if m.moe_shared_expert_gate else 0
    )
    return h * m.num_experts + routed + shared


def tflops_per_device(
    cfg: MegamftConfig, vocab_size: int, rows_per_second: float, world_size: int
) -> float:
    """Model TFLOP/s per device (model_flops) with each row of data.seq_length positions counted as one
    causal sequence: exact for unpacked rows, an upper bound for packed ones (a flash kernel skips the
    pairs across documents). The logged MFU is this over train.peak_tflops_per_device."""
    seq = cfg.data.seq_length
    return model_flops(cfg, vocab_size, [seq]) * rows_per_second / world_size / 1e12
