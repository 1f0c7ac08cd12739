"""RMSNorm and LayerNorm that work with sequence parallelism without TE or apex.

megatron-core's local-spec fallback (``WrappedTorchNorm``) refuses sequence
parallel. With sequence parallel each TP rank normalises a different slice of
the sequence, so the norm weight's gradient is partial on every rank; tagging
the parameter with ``sequence_parallel = True`` makes megatron's
``finalize_model_grads`` all-reduce it over the TP group, exactly as it does
for Transformer Engine's norms.

With ``config.layernorm_zero_centered_gamma`` (Gemma) the weight is stored
around 0 and applied as (1 + weight), as Transformer Engine's norms and
transformers' GemmaRMSNorm do.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)


class _MegamftNorm(torch.nn.Module):
    """Weight (and bias) on megatron's device, tagged for sequence parallel; replicated in checkpoints."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        # Where megatron puts its own parameters: the current GPU unless use_cpu_initialization.
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        make = torch.zeros if self.zero_centered else torch.ones  # the identity either way
        self.weight = torch.nn.Parameter(
            make(hidden_size, dtype=config.params_dtype, device=device)
        )
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(hidden_size, dtype=config.params_dtype, device=device)
            )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def scale(self) -> torch.Tensor:
        """The multiplier applied, in fp32."""
        return self.weight.float() + 1.0 if self.zero_centered else self.weight.float()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Replicated tensors, as megatron's sharded_state_dict_default stores a plain module's.

        Defined so that megatron modules which call it on every child (MLP) can hold a norm.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {},
            sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )


class MegamftRMSNorm(_MegamftNorm):
    """y = x / rms(x) * weight (or * (1 + weight)), computed in fp32, returned in the input dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        return (normed * self.scale()).to(hidden.dtype)


class MegamftLayerNorm(_MegamftNorm):
    """y = (x - mean) / std * weight + bias (StarCoder), in fp32, returned in the input dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.layer_norm(
            hidden.float(), (hidden.shape[-1],), self.scale(), self.bias.float(), eps=self.eps
        )
        return normed.to(hidden.dtype)


def norm_class(normalization: str) -> type[torch.nn.Module]:
    """megamft's norm for a model.normalization value."""
    return MegamftLayerNorm if normalization == "LayerNorm" else MegamftRMSNorm
