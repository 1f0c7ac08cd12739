"""The vocabulary size megamft pads to: the same at every tensor-parallel size."""

from __future__ import annotations

from megamft.config import ConfigError


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Vocab rounded up to a multiple of `multiple`, the same at every TP size.

    The padding must not depend on TP: padded rows take part in the softmax,
    so a checkpoint resharded to another TP would otherwise compute another loss.
    """
    padded = -(-vocab_size // multiple) * multiple
    if padded % tensor_parallel:
        raise ConfigError(
            f"padded vocab {padded} (vocab {vocab_size} rounded up to a multiple of {multiple}) "
            f"is not divisible by tensor_model_parallel_size={tensor_parallel}"
        )
    return padded
