"""Norms on the output of attention and of the MLP, before the residual add (Gemma 2).

megatron-core 0.16's TransformerLayer has norms before its sublayers only.
These subclasses of megatron's own SelfAttention and MLP add one norm on their
output (``post_layernorm``, megamft's norm of the model's kind), so the layer,
its bias-dropout-add, TP and sequence parallel stay megatron's: under sequence
parallel the norm sees the reduce-scattered positions and its weight is tagged
for the TP all-reduce like every other norm's. The weight is replicated in
checkpoints under ``self_attention.post_layernorm`` and ``mlp.post_layernorm``.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP

from megamft.model.norm import norm_class


def _post_norm(config):
    return norm_class(config.normalization)(
        config, config.hidden_size, eps=config.layernorm_epsilon
    )


def _normed(norm, output, bias):
    if bias is not None:  # skip_bias_add: the bias belongs before the norm
        output = output + bias
    return norm(output), None


class _OutputNormed:
    """Put before a megatron sublayer class: its output (and bias) goes through a norm of its own."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = _post_norm(config)

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        return _normed(self.post_layernorm, output, bias)


class PostNormSelfAttention(_OutputNormed, SelfAttention):
    """megatron's SelfAttention whose output is normalized (Gemma 2's post_attention_layernorm)."""


class PostNormMLP(_OutputNormed, MLP):
    """megatron's MLP whose output is normalized (Gemma 2's post_feedforward_layernorm)."""
