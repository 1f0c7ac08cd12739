"""Documents -> training sequences, in four modes, and sequences -> micro-batches.

A document of L ids gives L-1 (input, label) positions. Modes:
  pad      one document per sequence, padded to data.seq_length
  dynamic  one document per sequence, padded to the longest of its micro-batch
  pack     several whole documents per sequence, chosen best-fit within a
           shuffle window; positions restart per document and attention
           stays inside each document (block-diagonal causal mask)
  concat   MFTCoder-style: documents appended in order while they fit
           (next-fit), plain causal attention across them, positions running on
A document longer than a sequence is cut to its first seq_length positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("pad", "dynamic", "pack", "concat")


@dataclass
class Rows:
    """Sequences as lists of documents: row r holds documents offsets[r]:offsets[r+1] (offsets None: one
    document per row, as pad and dynamic have). The arrays may be memory maps of the index cache."""

    tasks: np.ndarray
    docs: np.ndarray
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tasks) if self.offsets is None else len(self.offsets) - 1

    def start(self, r: int) -> int:
        """The first document of row r (r may be len(self): the end)."""
        return r if self.offsets is None else int(self.offsets[r])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.start(r), self.start(r + 1)
        return self.tasks[a:b], self.docs[a:b]


def positions_of(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """(input, label) positions each document fills in a sequence."""
    return np.clip(lengths - 1, 0, seq_length)


def build_rows(
    tasks: np.ndarray,
    docs: np.ndarray,
    lengths: np.ndarray,
    mode: str,
    seq_length: int,
    window: int,
    seed: int,
) -> Rows:
    """Sequences of the documents (tasks[i], docs[i]) whose lengths are `lengths[i]`, in order."""
    sizes = positions_of(np.asarray(lengths, dtype=np.int64), seq_length)
    keep = np.flatnonzero(sizes > 0)
    return rows_of_sizes(
        np.asarray(tasks)[keep].astype(np.uint16),
        np.asarray(docs)[keep],
        sizes[keep].astype(np.int32),
        mode,
        seq_length,
        window,
        seed,
    )


def rows_of_sizes(
    tasks: np.ndarray,
    docs: np.ndarray,
    sizes: np.ndarray,
    mode: str,
    seq_length: int,
    window: int,
    seed: int,
) -> Rows:
    """Sequences of documents that fill `sizes` (1..seq_length) positions each: the modes' rule, computed by
    the index kernels (compiled; megamft.data.packing's Python functions where no compiler is found)."""
    from megamft.data import index_kernels

    if mode in ("pad", "dynamic"):
        return Rows(tasks, docs)
    if mode == "pack":
        flat, offsets = index_kernels.best_fit(
            sizes, seq_length, window, np.random.default_rng(seed)
        )
        return Rows(tasks[flat], docs[flat], offsets)
    if mode == "concat":
        return Rows(tasks, docs, index_kernels.next_fit(sizes, seq_length))
    raise ValueError(f"unknown data.mode {mode!r}; choose one of {', '.join(MODES)}")


# ---------------------------------------------------------------- collation


def collate(
    rows: list[tuple[np.ndarray, np.ndarray]],
    stores,
    mode: str,
    length: int,
    pad_id: int,
    dense_mask: bool = True,
) -> dict:
    """One micro-batch of `length` positions from rows of (tasks, docs); stores[task].get(doc) gives ids, mask.

    pack mode: `cu_seqlens` always; the dense [b, 1, s, s] `attention_mask` only with dense_mask
    (megatron's local attention needs it; the torch and TE backends read cu_seqlens).
    """
    b = len(rows)
    tokens = np.full((b, length), pad_id, dtype=np.int64)
    labels = np.full((b, length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, length), dtype=np.float32)
    task_ids = np.zeros((b, length), dtype=np.int64)
    sample_ids = np.zeros((b, length), dtype=np.int64)
    padding = np.zeros((b, length), dtype=bool)
    position_ids = np.tile(np.arange(length, dtype=np.int64), (b, 1))
    for r, (row_tasks, row_docs) in enumerate(rows):
        at = 0
        for k, (task, doc) in enumerate(zip(row_tasks.tolist(), row_docs.tolist())):
            ids, mask = stores[task].get(doc)
            n = min(len(ids) - 1, length - at)
            tokens[r, at : at + n] = ids[:n]
            labels[r, at : at + n] = ids[1 : n + 1]
            loss_mask[r, at : at + n] = mask[1 : n + 1]
            task_ids[r, at : at + n] = task
            sample_ids[r, at : at + n] = k
            if mode == "pack":
                position_ids[r, at : at + n] = np.arange(n)
            at += n
        if mode == "pack":  # padding: its own block, so no row of the mask is empty
            position_ids[r, at:] = np.arange(length - at)
        task_ids[r, at:] = row_tasks[-1] if len(row_tasks) else 0
        sample_ids[r, at:] = len(row_tasks)  # padding: a block of its own
        padding[r, at:] = True
    batch = {
        name: torch.from_numpy(value)
        for name, value in (
            ("tokens", tokens),
            ("labels", labels),
            ("loss_mask", loss_mask),
            ("task_ids", task_ids),
            ("sample_ids", sample_ids),
            ("position_ids", position_ids),
            ("padding", padding),
        )
    }
    if mode == "pack":
        if dense_mask:
            batch["attention_mask"] = document_attention_mask(batch["sample_ids"])
        batch["cu_seqlens"] = document_boundaries(sample_ids)
    return batch


def document_boundaries(segment: np.ndarray) -> torch.Tensor:
    """Cumulative lengths of the documents (padding blocks included) of the flattened batch."""
    flat = segment.reshape(-1)
    row_starts = np.zeros(flat.shape, dtype=bool)
    row_starts[:: segment.shape[1]] = True
    starts = np.flatnonzero(row_starts | np.concatenate([[True], flat[1:] != flat[:-1]]))
    return torch.from_numpy(np.append(starts, len(flat)).astype(np.int32))


def document_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean, True where attention is blocked: across documents, or to the future."""
    s = segment.shape[1]
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)


def batch_length(
    rows: list[tuple[np.ndarray, np.ndarray]], stores, seq_length: int, multiple: int
) -> int:
    """dynamic mode: the longest document of the rows, rounded up to `multiple`, at most seq_length."""
    longest = max(
        (
            stores[t].lengths[d] - 1
            for row_tasks, row_docs in rows
            for t, d in zip(row_tasks.tolist(), row_docs.tolist())
        ),
        default=1,
    )
    return int(min(seq_length, -(-max(longest, 1) // multiple) * multiple))
