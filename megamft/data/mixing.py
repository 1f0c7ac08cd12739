"""Task mixing: which documents of which task make up each data epoch, in which order.

Every task's training documents form an endless stream of seeded
permutations (one per pass over the task). A data epoch takes `quota[t]`
documents from the stream of task t, where the quotas split
`epoch_samples` by the sampling weights; so a task whose quota exceeds its
size is upsampled (it repeats, every document before any twice) and a task
with a smaller quota is downsampled (the next epoch continues where this one
stopped). Tasks are then interleaved at random. Everything is a
function of the seed, so every rank computes the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megamft.config import ConfigError
from megamft.data import index_kernels

_SPLIT_SALT = 7919  # separate seed streams: train/valid split, task passes, epoch shuffles
_PASS_SALT = 104729
_EPOCH_SALT = 1299709


def split_train_valid(
    num_documents: int, valid: int, max_train: int | None, seed: int, task_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document indices of one task: a seeded split, the same on every rank."""
    order = _permutation(np.random.default_rng([seed, _SPLIT_SALT, task_id]), num_documents)
    valid_docs = np.sort(order[:valid])
    if max_train is None or max_train >= num_documents - len(
        valid_docs
    ):  # all the others: no sort needed
        return np.delete(np.arange(num_documents, dtype=order.dtype), valid_docs), valid_docs
    return np.sort(order[valid:][:max_train]), valid_docs


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """rng.permutation(n) in int32 (the same values: a shuffle's draws depend on n alone), half the memory,
    through the compiled shuffle."""
    return index_kernels.permutation(rng, n)


def sampling_weights(
    kind: str, sizes: list[int], explicit: dict[str, float], names: list[str]
) -> np.ndarray:
    """Normalised per-task probabilities: 'proportional' to size, 'uniform', or explicit 'weights'."""
    if kind == "proportional":
        weights = np.asarray(sizes, dtype=np.float64)
    elif kind == "uniform":
        weights = np.ones(len(sizes))
    else:
        unknown = sorted(set(explicit) - set(names))
        if unknown:
            raise ConfigError(
                f"data.task_sampling_weights names unknown task(s) {unknown}; tasks are {names}"
            )
        weights = np.asarray([float(explicit.get(name, 0.0)) for name in names])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError("data.task_sampling_weights must be non-negative with a positive sum")
    return weights / weights.sum()


def quotas(weights: np.ndarray, epoch_samples: int) -> np.ndarray:
    """Documents per task in one data epoch: epoch_samples split by weight (largest remainder)."""
    exact = weights * epoch_samples
    counts = np.floor(exact).astype(np.int64)
    remainder = epoch_samples - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


@dataclass
class TaskMixture:
    """The document order of every data epoch."""

    train_docs: list[np.ndarray]  # per task: its training document indices
    weights: np.ndarray
    epoch_samples: int
    seed: int

    def __post_init__(self):
        self.quota = quotas(self.weights, self.epoch_samples)
        for task, (docs, quota) in enumerate(zip(self.train_docs, self.quota)):
            if quota > 0 and len(docs) == 0:
                raise ConfigError(f"task {task} has a sampling weight but no training documents")

    def _task_stream(self, task: int, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) of the endless stream of permutations of a task's documents."""
        docs = self.train_docs[task]
        n = len(docs)
        if stop <= start:
            return np.zeros(0, dtype=np.int32)
        parts = []
        for p in range(start // n, (stop - 1) // n + 1):
            low, high = max(start - p * n, 0), min(stop - p * n, n)
            # docs[rng.permutation(n)]: the same swaps made on a copy of docs
            passed = index_kernels.permutation(
                np.random.default_rng([self.seed, _PASS_SALT, task, p]),
                np.asarray(docs, dtype=np.int32),
            )
            parts.append(passed[low:high])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def epoch_tasks(self, epoch: int) -> np.ndarray:
        """The task of every document of data epoch `epoch`, interleaved at random (uint16)."""
        rng = np.random.default_rng([self.seed, _EPOCH_SALT, epoch])
        # The permutation of an array depends on its length alone: uint16 gives the int64 order in a quarter
        # of the memory.
        return index_kernels.permutation(
            rng, np.repeat(np.arange(len(self.quota), dtype=np.uint16), self.quota)
        )

    def epoch_streams(self, epoch: int) -> list[np.ndarray]:
        """Per task, its documents of data epoch `epoch`, in order (int32)."""
        return [
            self._task_stream(task, epoch * int(quota), (epoch + 1) * int(quota))
            for task, quota in enumerate(self.quota)
        ]

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(task, document) of every document of data epoch `epoch`.

        Tasks are interleaved at random; each task's documents keep their
        stream order, so an upsampled task shows every document before any twice.
        """
        tasks = self.epoch_tasks(epoch)
        docs = np.empty(len(tasks), dtype=np.int32)
        for task, stream in enumerate(self.epoch_streams(epoch)):
            docs[tasks == task] = stream
        return tasks, docs
