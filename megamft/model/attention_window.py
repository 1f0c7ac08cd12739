"""Sliding-window attention (Mistral, StarCoder2) on megatron-core's attention backends.

Hugging Face's ``sliding_window`` W lets a token see itself and the W - 1 tokens
before it; megatron's ``window_size=(W - 1, 0)`` means the same for both
backends. Transformer Engine applies it inside its fused attention, packed
('thd') sequences included. megatron-core's local attention applies it in its
torch softmax by building its own windowed causal mask, which replaces the
mask it was given: packed documents would then see each other, so that
combination is refused. The torch backend applies it in flash attention's
varlen kernel on a GPU (packed or not, memory linear in the sequence) and as
a banded mask in SDPA elsewhere, with the documents' mask kept. A window at
least as long as the sequence changes nothing and is not passed at all.
"""

from __future__ import annotations

from megamft.config import ConfigError, MegamftConfig


def window_size(cfg: MegamftConfig) -> tuple[int, int] | None:
    """megatron's window_size, or None when the window covers every training sequence."""
    window = cfg.model.sliding_window
    if not window or window >= cfg.data.seq_length:
        return None
    return (window - 1, 0)


def check_backend_honours_window(cfg: MegamftConfig, backend: str) -> None:
    """Raise if the attention backend in use (te, torch or local) would drop the window or the document mask."""
    if window_size(cfg) is None or backend in ("te", "torch"):
        return
    if cfg.transformer.get("masked_softmax_fusion"):
        raise ConfigError(
            f"model.sliding_window ({cfg.model.sliding_window}) is shorter than data.seq_length "
            f"({cfg.data.seq_length}): transformer.masked_softmax_fusion must stay off with megatron-core's local "
            "attention, whose fused softmax kernel ignores the window"
        )
    if cfg.data.mode != "pack":
        return
    raise ConfigError(
        f"model.sliding_window ({cfg.model.sliding_window}) is shorter than data.seq_length "
        f"({cfg.data.seq_length}) and data.mode=pack: megatron-core's local attention replaces the packed "
        "documents' mask with its window mask. Use data.mode=pad|dynamic, a data.seq_length up to the "
        "window, or model.attention_backend=torch (or auto)"
    )
