"""The set of sample digests `megamft-preprocess --dedup` has seen, in flat arrays.

A Python set of 12-byte `bytes` costs about 110 bytes a sample (the object and its slot): 11 GB for a
corpus of 10^8 samples. Here a digest takes one slot of an open-addressing table of two numpy arrays (its
first 8 and last 4 bytes) kept at most half full: 24 to 48 bytes a sample, so preprocessing memory stays
small beside the corpus even though this table (the one thing that grows) must remember every sample.
"""

from __future__ import annotations

import numpy as np

DIGEST_BYTES = 12


class DigestSet:
    """Distinct 12-byte digests; `first_seen` says which of a batch are new, in order."""

    def __init__(self, capacity: int = 1 << 16):
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        """Empty slots for at least `capacity` digests (a power of two)."""
        self._size = 1 << max(int(capacity) - 1, 1).bit_length()
        self._high = np.zeros(self._size, np.uint64)
        self._low = np.zeros(self._size, np.uint32)
        self._used = np.zeros(self._size, np.bool_)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return self._high.nbytes + self._low.nbytes + self._used.nbytes

    def first_seen(self, digests: list[bytes]) -> list[int]:
        """Indices of the digests not seen before (in this batch or an earlier one), adding them."""
        for digest in digests:
            if len(digest) != DIGEST_BYTES:
                raise ValueError(f"a digest has {len(digest)} bytes, not {DIGEST_BYTES}")
        if self.count + len(digests) > self._size // 2:
            self._grow(self.count + len(digests))
        parts = np.frombuffer(b"".join(digests), dtype=[("high", "<u8"), ("low", "<u4")])
        return [
            index
            for index, (high, low) in enumerate(zip(parts["high"].tolist(), parts["low"].tolist()))
            if self._insert(high, low)
        ]

    def _insert(self, high: int, low: int) -> bool:
        mask = self._size - 1
        slot = high & mask  # the digest's bytes are uniformly random already
        while self._used[slot]:
            if self._high[slot] == high and self._low[slot] == low:
                return False
            slot = (slot + 1) & mask
        self._used[slot], self._high[slot], self._low[slot] = True, high, low
        self.count += 1
        return True

    def _grow(self, needed: int) -> None:
        high, low = self._high[self._used].tolist(), self._low[self._used].tolist()
        self._allocate(2 * needed)
        for h, lo in zip(high, low):
            self._insert(h, lo)
