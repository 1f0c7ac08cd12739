"""The packing rules in plain Python: best-fit decreasing per window (pack mode) and next-fit (concat mode).

The reference the compiled index kernels (index_kernels.c) are tested against, and their fallback where no
C compiler is found."""

from __future__ import annotations

import bisect

import numpy as np


def best_fit_groups(
    sizes: np.ndarray, capacity: int, window: int, rng: np.random.Generator
) -> list[list[int]]:
    """Pack items (sizes in order) into bins of `capacity`, best-fit decreasing per window of items.

    Bins still open when a window ends stay open for the next one, so small
    leftovers fill up; a bin leaves once nothing seen so far would fit it.
    Each window's closed bins are shuffled, so the order stays random.
    """
    groups: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin id) of open bins
    bins: dict[int, list[int]] = {}
    next_id = 0
    for start in range(0, len(sizes), window):
        index = np.arange(start, min(start + window, len(sizes)))
        index = index[np.argsort(-sizes[index], kind="stable")]
        for item in index.tolist():
            size = int(sizes[item])
            slot = bisect.bisect_left(free, (size, -1))
            if slot < len(free):
                space, bin_id = free.pop(slot)
            else:
                space, bin_id, next_id = capacity, next_id, next_id + 1
                bins[bin_id] = []
            bins[bin_id].append(item)
            if space - size > 0:
                bisect.insort(free, (space - size, bin_id))
            else:
                groups.append(bins.pop(bin_id))
        smallest = int(sizes[index].min()) if len(index) else 1
        closing = [entry for entry in free if entry[0] < smallest]
        free = [entry for entry in free if entry[0] >= smallest]
        done = [bins.pop(bin_id) for _, bin_id in closing]
        groups += [done[i] for i in rng.permutation(len(done))]
    groups += [bins.pop(bin_id) for _, bin_id in free]
    return groups


def next_fit_groups(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Items in order; a new bin starts whenever the next item does not fit (MFTCoder's packing)."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for item, size in enumerate(sizes.tolist()):
        if current and used + size > capacity:
            groups.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        groups.append(current)
    return groups
