"""RMSNorm and LayerNorm that work with sequence parallelism without TE or apex.

megatron-core's local-spec fallback (``WrappedTorchNorm``) refuses sequence
parallel. With sequence parallel each TP rank normalises a different slice of
the sequence, so the norm weight's gradient is partial on every rank; tagging
the parameter with ``sequence_parallel = True`` makes megatron's
``finalize_model_grads`` all-reduce it over the TP group, exactly as it does
for Transformer Engine's norms.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class MegamftRMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight, computed in fp32, returned in the input dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        # Where megatron puts its own parameters: the current GPU unless use_cpu_initialization.
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()).to(hidden.dtype)


class MegamftLayerNorm(torch.nn.Module):
    """y = (x - mean) / std * weight + bias (StarCoder2), in fp32, returned in the input dtype.

    Weight and bias are tagged for sequence parallel like MegamftRMSNorm's weight.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.layer_norm(
            hidden.float(), (hidden.shape[-1],), self.weight.float(), self.bias.float(), eps=self.eps)
        return normed.to(hidden.dtype)


def norm_class(normalization: str) -> type[torch.nn.Module]:
    """megamft's norm for a model.normalization value."""
    return MegamftLayerNorm if normalization == "LayerNorm" else MegamftRMSNorm
