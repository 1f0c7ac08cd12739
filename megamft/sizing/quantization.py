"""The layout of a 4-bit NF4 tensor with double quantization (bitsandbytes' format), in bytes."""

from __future__ import annotations

BLOCK = 64  # values per NF4 block (bitsandbytes' default for 4-bit)
NESTED_BLOCK = 256  # block maxima per double-quantization block


def quantized_bytes(numel: int) -> int:
    """Bytes quantize_nf4 keeps for a tensor of `numel` values: the 4-bit codes, one 8-bit maximum per block,
    one fp32 maximum per 256 blocks, the offset and the two code tables (16 and 256 fp32 levels)."""
    blocks = -(-numel // BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 + 4 * (16 + 256)
