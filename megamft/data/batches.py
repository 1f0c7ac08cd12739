"""Fixed-length micro-batches and a deterministic, DP-sharded sample order.

Every rank computes the same global order from the seed, so the batch is
identical on all TP and PP ranks of a replica and disjoint across DP ranks;
the position in the order is a plain sample count, so resuming at step k
continues exactly where the run stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megamft.data.template import TokenizedSample


@dataclass
class SampleTable:
    """Samples padded to one length: what micro-batches are cut from."""

    tokens: torch.Tensor     # [N, S] int64, input ids
    labels: torch.Tensor     # [N, S] int64, next-token targets
    loss_mask: torch.Tensor  # [N, S] float32, 1 where the label is learned
    task_ids: torch.Tensor   # [N, S] int64, task of every token

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        batch = {
            "tokens": self.tokens[index],
            "labels": self.labels[index],
            "loss_mask": self.loss_mask[index],
            "task_ids": self.task_ids[index],
        }
        batch["position_ids"] = torch.arange(self.tokens.shape[1]).expand_as(batch["tokens"])
        return batch


def pad_samples(samples: list[TokenizedSample], seq_length: int, pad_id: int) -> SampleTable:
    """Shift into (input, label) pairs and pad every sample to seq_length."""
    n = len(samples)
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, seq_length), dtype=torch.float32)
    task_ids = torch.zeros((n, seq_length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = sample.ids[: seq_length + 1]
        length = len(ids) - 1
        tokens[row, :length] = torch.tensor(ids[:-1])
        labels[row, :length] = torch.tensor(ids[1:])
        loss_mask[row, :length] = torch.tensor(sample.loss_mask[1 : length + 1], dtype=torch.float32)
        task_ids[row, :] = sample.task_id
    return SampleTable(tokens, labels, loss_mask, task_ids)


class GlobalBatchSampler:
    """Sample indices of global batch k, reshuffled every epoch, sliced per DP rank."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < 1:
            raise ValueError("no training samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def global_indices(self, consumed_samples: int) -> np.ndarray:
        """The next global batch after `consumed_samples` samples."""
        positions = np.arange(consumed_samples, consumed_samples + self.global_batch_size)
        epochs = positions // self.num_samples
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            picked = epochs == epoch
            out[picked] = self._order(int(epoch))[positions[picked] % self.num_samples]
        return out

    def rank_indices(self, consumed_samples: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """This DP rank's contiguous share of the global batch."""
        share = self.global_batch_size // dp_size
        return self.global_indices(consumed_samples)[dp_rank * share : (dp_rank + 1) * share]


def micro_batches(table: SampleTable, indices: np.ndarray, micro_batch_size: int) -> list[dict]:
    """Cut a rank's share into micro-batches, in order."""
    return [
        table.rows(indices[start : start + micro_batch_size])
        for start in range(0, len(indices), micro_batch_size)
    ]
