"""Model FLOPs, TFLOP/s per device and MFU for a Llama-style decoder."""

from __future__ import annotations

import psutil
import torch

from megamft.config import MegamftConfig
from megamft.model.architecture import fc1_width, kv_width, mlp_matrices, query_width


def flops_per_token(cfg: MegamftConfig, vocab_size: int) -> float:
    """Training FLOPs per token: 2 per multiply-add, x3 for forward + backward.

    Matmuls: QKV (with grouped KV), attention output, SwiGLU's three matrices
    (GELU's two; for MoE the router, the top-k experts and the shared expert), the
    output layer; attention scores and values add 2 x 2 x seq x heads x head_dim per layer. Full activation recompute runs the forward pass once more (x4 / 3).
    """
    m = cfg.model
    h, s = m.hidden_size, cfg.data.seq_length
    q, kv = query_width(m), kv_width(m)
    per_layer = 2 * (h * (q + 2 * kv) + q * h + _mlp_multiply_adds(m)) + 2 * 2 * s * q
    forward = m.num_layers * per_layer + 2 * h * vocab_size
    factor = 4 if cfg.transformer.get("recompute_granularity") == "full" else 3
    return float(forward * factor)


def model_flops(cfg: MegamftConfig, vocab_size: int, document_lengths: list[int]) -> float:
    """Model FLOPs of one training pass over documents of these lengths: MFU's numerator.

    flops_per_token counts what megatron's local attention computes, the full s x s scores of
    every row. Model FLOPs count only the pairs attention needs, the causal ones inside each
    document (d (d + 1) / 2 for d tokens), as flash kernels compute them. With LoRA the
    frozen weights take no weight gradient (forward and input gradient: x2), the adapters
    x3. Activation recompute is extra hardware work, not model work, and is not counted.
    """
    m = cfg.model
    tokens = sum(document_lengths)
    h, q, kv = m.hidden_size, query_width(m), kv_width(m)
    weight_macs = m.num_layers * (h * (q + 2 * kv) + q * h + _mlp_multiply_adds(m)) + h * vocab_size
    pairs = sum(d * (d + 1) // 2 for d in document_lengths)
    attention = 3 * m.num_layers * 2 * 2 * q * pairs  # scores and values, forward + backward
    if not cfg.lora.enabled:
        return float(3 * 2 * weight_macs * tokens + attention)
    adapter_macs = m.num_layers * cfg.lora.rank * sum(_adapter_width(m, target) for target in cfg.lora.targets)
    return float(2 * 2 * weight_macs * tokens + 3 * 2 * adapter_macs * tokens + attention)


def _adapter_width(m, target: str) -> int:
    """in + out of the linear a LoRA adapter wraps: A is [r, in], B is [out, r]."""
    h, q, kv = m.hidden_size, query_width(m), kv_width(m)
    return {"linear_qkv": h + q + 2 * kv, "linear_proj": q + h, "linear_fc1": h + fc1_width(m),
            "linear_fc2": m.ffn_hidden_size + h}[target]


def _mlp_multiply_adds(m) -> int:
    """Multiply-adds of one token through one layer's MLP: the dense MLP, or the router, the top-k
    routed experts and the shared expert of an MoE layer."""
    h = m.hidden_size
    if not m.num_experts:
        return mlp_matrices(m) * h * m.ffn_hidden_size
    routed = m.moe_router_topk * 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0) + (h if m.moe_shared_expert_gate else 0)
    return h * m.num_experts + routed + shared


def tflops_per_device(cfg: MegamftConfig, vocab_size: int, tokens_per_second: float, world_size: int) -> float:
    return flops_per_token(cfg, vocab_size) * tokens_per_second / world_size / 1e12


def memory_gb() -> float:
    """Peak device memory on GPUs and under the strict emulation (since the last reset); else resident memory."""
    from megamft.platform import cpu_emulation

    if torch.cuda.is_available() or cpu_emulation.is_strict():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30
