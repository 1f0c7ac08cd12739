"""Preference pairs as training micro-batches: both halves of a pair always in the same micro-batch.

A preprocessed preference task (manifest `"preference": true`) stores pair k as
documents 2k (chosen) and 2k+1 (rejected). A micro-batch of P pairs is either 2P
rows, one half each, padded to a common length (`pair_micro_batch`), or (data.mode
pack, `packed_pair_micro_batch`) its 2P documents packed best-fit into as few rows
as hold them, each document its own block (positions restart, attention stays
inside it). Either way it carries the per-token `pair_ids` and `pair_half` that
megamft.training.preference_step reads, and `ref_logps` [P, 2].
"""

from __future__ import annotations

import numpy as np
import torch

from megamft.data.attention_boundaries import add_document_boundaries
from megamft.data.packing import best_fit_groups
from megamft.data.sequences import collate, positions_of


def pair_micro_batch(
    pairs: list[tuple[int, int]],
    stores,
    length: int,
    pad_id: int,
    ref_logps: torch.Tensor | None = None,
) -> dict:
    """The micro-batch of `pairs`, each (task, pair index), padded to `length` positions."""
    rows = [
        (np.array([task]), np.array([2 * pair + half])) for task, pair in pairs for half in (0, 1)
    ]
    batch = collate(rows, stores, "pad", length, pad_id)
    row = torch.arange(len(rows)).unsqueeze(1).expand(-1, length)
    batch["pair_ids"] = (row // 2).clone()
    batch["pair_half"] = torch.where(batch["padding"], -1, row % 2)
    batch["ref_logps"] = (
        torch.zeros(len(pairs), 2, dtype=torch.float64) if ref_logps is None else ref_logps
    )
    return batch


def pair_rows(pairs: list[tuple[int, int]], stores, length: int) -> list[list[int]]:
    """The packed rows of `pairs`' documents: lists of indices 2p + half (p: the pair's place in `pairs`),
    best-fit decreasing into rows of `length` positions (deterministic: every rank packs alike)."""
    sizes = np.array(
        [
            positions_of(np.int64(stores[task].lengths[2 * pair + half]), length)
            for task, pair in pairs
            for half in (0, 1)
        ],
        dtype=np.int64,
    )
    return best_fit_groups(sizes, length, max(len(sizes), 1), np.random.default_rng(0))


def packed_pair_micro_batch(
    pairs: list[tuple[int, int]],
    stores,
    length: int,
    pad_id: int,
    packed_attention: str,
    rows: int | None = None,
    ref_logps: torch.Tensor | None = None,
) -> dict:
    """The micro-batch of `pairs` with their documents packed (`pair_rows`), padded with empty rows to
    `rows` (None: as many as the packing needs); boundaries for `packed_attention` (a PACKED_ATTENTION
    value)."""
    groups = pair_rows(pairs, stores, length)
    rows = len(groups) if rows is None else rows
    if rows < len(groups):
        raise ValueError(f"{len(pairs)} pairs need {len(groups)} packed rows, more than {rows}")
    groups += [[] for _ in range(rows - len(groups))]
    docs = [
        (
            np.array([pairs[i // 2][0] for i in g], dtype=np.int64),
            np.array([2 * pairs[i // 2][1] + i % 2 for i in g], dtype=np.int64),
        )
        for g in groups
    ]
    batch = collate(docs, stores, "pack", length, pad_id, dense_mask=packed_attention == "mask")
    # sample_ids number a row's documents in order, its padding len(row): look up pair and half
    pair_of = [torch.tensor([i // 2 for i in g] + [0]) for g in groups]
    half_of = [torch.tensor([i % 2 for i in g] + [-1]) for g in groups]
    ids = batch["sample_ids"]
    batch["pair_ids"] = torch.stack([pair_of[r][ids[r]] for r in range(rows)])
    batch["pair_half"] = torch.stack([half_of[r][ids[r]] for r in range(rows)])
    batch["ref_logps"] = (
        torch.zeros(len(pairs), 2, dtype=torch.float64) if ref_logps is None else ref_logps
    )
    add_document_boundaries(batch, packed_attention)
    return batch


def split_pairs(
    pairs: list[tuple[int, int]], dp_rank: int, dp_size: int, pairs_per_micro_batch: int
) -> list[list[tuple[int, int]]]:
    """This DP rank's share of a global batch of pairs, cut into micro-batches of whole pairs."""
    if len(pairs) % (dp_size * pairs_per_micro_batch):
        raise ValueError(
            f"{len(pairs)} pairs do not fill {dp_size} ranks x micro-batches of {pairs_per_micro_batch}"
        )
    share = len(pairs) // dp_size
    mine = pairs[dp_rank * share : (dp_rank + 1) * share]
    return [mine[i : i + pairs_per_micro_batch] for i in range(0, share, pairs_per_micro_batch)]


def step_rows(
    pairs: list[tuple[int, int]], stores, length: int, dp_size: int, pairs_per_micro_batch: int
) -> int:
    """Packed rows of the fullest micro-batch of a global batch of pairs, over all DP ranks: the row count
    every micro-batch of the step gets (megatron's schedule takes one shape), computed alike on every rank
    from the documents' lengths alone."""
    return max(
        len(pair_rows(cut, stores, length))
        for rank in range(dp_size)
        for cut in split_pairs(pairs, rank, dp_size, pairs_per_micro_batch)
    )


class PairSchedule:
    """Which pairs each step trains on: a seeded permutation of all training pairs per epoch.

    The first `valid_per_task` pairs of each task (in a seeded order) are held out for validation and never
    trained on. A step's global batch depends only on (seed, step), so a resumed run continues with the
    very pairs an uninterrupted one would have used.
    """

    def __init__(
        self, pairs_per_task: list[int], valid_per_task: int, pairs_per_step: int, seed: int
    ):
        rng = np.random.default_rng(seed)
        self.train, self.valid = [], []
        for task, count in enumerate(pairs_per_task):
            order = rng.permutation(count)
            self.valid += [(task, int(k)) for k in order[:valid_per_task]]
            self.train += [(task, int(k)) for k in order[valid_per_task:]]
        if len(self.train) < pairs_per_step:
            raise ValueError(
                f"{len(self.train)} training pairs cannot fill a step of {pairs_per_step}"
            )
        self.pairs_per_step, self.seed = pairs_per_step, seed
        self._epochs: dict[int, list[tuple[int, int]]] = {}

    def _epoch(self, epoch: int) -> list[tuple[int, int]]:
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            self._epochs = {
                epoch: [self.train[i] for i in order]
            }  # one epoch kept: constant memory
        return self._epochs[epoch]

    def step(self, step: int) -> list[tuple[int, int]]:
        """The global batch of `step` (0-based): whole steps per epoch, the epoch's remainder left out."""
        per_epoch = len(self.train) // self.pairs_per_step
        epoch, index = divmod(step, per_epoch)
        return self._epoch(epoch)[index * self.pairs_per_step : (index + 1) * self.pairs_per_step]
