"""Counting the device-to-host synchronizations of a piece of work, on a GPU and under the CPU emulation.

Each synchronization stalls the host until the GPU's queue of work drains; a
step should have a few, not one per layer. Under the strict CPU emulation every
read of an emulated device tensor is counted. On CUDA, with
``MEGAMFT_COUNT_SYNCS=1``, torch's sync debug mode (``torch.cuda.set_sync_debug_mode``)
reports each synchronizing call as a warning, which is counted; it costs a
little, so it is off unless asked for (the GPU check asks).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch

from megamft.emulation import cpu_emulation

COUNT_ON_CUDA = "MEGAMFT_COUNT_SYNCS"
_CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"


class SyncCount:
    """The number of synchronizations counted, or None where nothing counts them."""

    value: int | None = None


@contextlib.contextmanager
def counting_syncs() -> Iterator[SyncCount]:
    """`with counting_syncs() as count:` ...; afterwards `count.value` is the work's synchronizations."""
    count = SyncCount()
    if cpu_emulation.is_strict():
        before = cpu_emulation.sync_count()
        yield count
        count.value = cpu_emulation.sync_count() - before
    elif torch.cuda.is_available() and os.environ.get(COUNT_ON_CUDA) == "1":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        count.value = sum(_CUDA_SYNC_WARNING in str(w.message) for w in caught)
    else:
        yield count
