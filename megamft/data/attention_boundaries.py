"""How a packed micro-batch's document boundaries reach each attention backend: a dense mask, Transformer
Engine's "thd" PackedSeqParams, or RowDocuments for the torch backend."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class RowDocuments(PackedSeqParams):
    """Document boundaries of packed ``[b, s]`` rows, for the torch backend.

    ``cu_seqlens_q`` (= ``cu_seqlens_kv``, int32) are the cumulative lengths of
    the documents of the flattened micro-batch, with a cut at every row start,
    so micro-batches of several rows work. ``max_seqlen_q``/``_kv`` are the row
    length: megatron sizes RoPE from them whenever packed_seq_params is given,
    and RoPE runs over the whole row (``qkv_format`` is "sbhd", not "thd", so
    megatron keeps the batch dimension). RoPE is relative, so a document's
    attention does not depend on where in the row it starts.
    """

    max_document_length: int = None
    """The longest document (what varlen_attn's kernel grid is sized by)."""


def packed_seq_params(batch: dict):
    """megatron-core PackedSeqParams ("thd") from a packed micro-batch of one row, for Transformer Engine."""
    if batch["tokens"].shape[0] != 1:
        raise ValueError("packed sequences with Transformer Engine need train.micro_batch_size=1")
    cu = batch["cu_seqlens"]
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def row_documents(batch: dict):
    """RowDocuments (the torch attention backend's boundaries) of a packed micro-batch of any size."""
    cu = batch["cu_seqlens"]
    length = batch["tokens"].shape[1]
    return RowDocuments(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=length,
        max_seqlen_kv=length,
        max_document_length=int((cu[1:] - cu[:-1]).max()),
    )


PACKED_ATTENTION = {"local": "mask", "te": "thd", "torch": "rows"}
"""How packed rows reach each attention backend: a dense mask, TE's thd format, or RowDocuments."""


def add_document_boundaries(batch: dict, packed_attention: str) -> None:
    """Give a packed micro-batch the boundaries its backend reads (a PACKED_ATTENTION value): the
    dense mask collate built ('mask'), or packed_seq_params from its cu_seqlens ('thd', 'rows')."""
    if packed_attention != "mask":
        batch["packed_seq_params"] = (
            packed_seq_params if packed_attention == "thd" else row_documents
        )(batch)
