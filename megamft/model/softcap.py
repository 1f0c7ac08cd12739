"""Logit soft-capping (Gemma 2): cap * tanh(x / cap) on attention scores and on the output logits.

Attention soft-capping changes the scores before the softmax, inside core
attention, so only a backend that computes it may run such a model:
- torch: ``softcapped_attention`` below, as transformers' eager attention
  does it (scores materialized, [b, heads, s, s] per layer: quadratic in
  memory; packed rows, windows and GQA as in the SDPA path);
- te: Transformer Engine's DotProductAttention has no soft-cap argument, and
  megatron-core passes none: refused;
- local: megatron-core's DotProductAttention has none either: refused.
``auto`` picks torch for such a model. Final-logit soft-capping is applied to
the output layer's logits, so every backend and both loss paths see it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megamft.config import ModelConfig


def softcapped_attention(
    query,
    key,
    value,
    allowed: Optional[torch.Tensor],
    causal: bool,
    dropout: float,
    scale: float,
    cap: float,
) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap), masked) v; [s, b, heads, dim] in and out.

    `allowed`: SDPA's convention (True = may attend), broadcast over [b, heads, s, s].
    Grouped key/value heads serve consecutive query heads, as megatron groups them.
    """
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
    if k.shape[1] != q.shape[1]:
        repeats = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v).permute(2, 0, 1, 3)


def apply_final_logit_softcap(gpt_model, model: ModelConfig) -> None:
    """Soft-cap the logits of a GPTModel chunk holding the output layer (a forward hook on it).

    Elementwise, so each TP rank caps its vocabulary shard; the loss (megatron's or
    the fused one) and generation read the capped logits.
    """
    cap = model.final_logit_softcap
    if not cap or getattr(gpt_model, "output_layer", None) is None:
        return

    def softcap(module, inputs, output):
        logits, bias = output
        return torch.tanh(logits / cap) * cap, bias

    gpt_model.output_layer.register_forward_hook(softcap)
