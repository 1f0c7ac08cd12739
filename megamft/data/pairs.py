"""Preference pairs as training micro-batches: both halves of a pair always in the same micro-batch.

A preprocessed preference task (manifest `"preference": true`) stores pair k as
documents 2k (chosen) and 2k+1 (rejected). A micro-batch of P pairs is 2P rows,
one half each, padded to a common length (pad mode: no packing, so no attention
crosses a document), with the per-token `pair_ids` and `pair_half` that
megamft.training.preference_step reads, and `ref_logps` [P, 2].
"""

from __future__ import annotations

import numpy as np
import torch

from megamft.data.sequences import collate


def pair_micro_batch(pairs: list[tuple[int, int]], stores, length: int, pad_id: int,
                     ref_logps: torch.Tensor | None = None) -> dict:
    """The micro-batch of `pairs`, each (task, pair index), padded to `length` positions."""
    rows = [(np.array([task]), np.array([2 * pair + half])) for task, pair in pairs for half in (0, 1)]
    batch = collate(rows, stores, "pad", length, pad_id)
    row = torch.arange(len(rows)).unsqueeze(1).expand(-1, length)
    batch["pair_ids"] = (row // 2).clone()
    batch["pair_half"] = torch.where(batch["padding"], -1, row % 2)
    batch["ref_logps"] = torch.zeros(len(pairs), 2, dtype=torch.float64) if ref_logps is None else ref_logps
    return batch


def split_pairs(pairs: list[tuple[int, int]], dp_rank: int, dp_size: int, pairs_per_micro_batch: int
                ) -> list[list[tuple[int, int]]]:
    """This DP rank's share of a global batch of pairs, cut into micro-batches of whole pairs."""
    if len(pairs) % (dp_size * pairs_per_micro_batch):
        raise ValueError(f"{len(pairs)} pairs do not fill {dp_size} ranks x micro-batches of {pairs_per_micro_batch}")
    share = len(pairs) // dp_size
    mine = pairs[dp_rank * share:(dp_rank + 1) * share]
    return [mine[i:i + pairs_per_micro_batch] for i in range(0, share, pairs_per_micro_batch)]
