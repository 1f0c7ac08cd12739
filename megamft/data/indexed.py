"""megatron-core's indexed dataset format (.bin/.idx), written here and read with megatron's reader.

Writing is ours (streamed, atomic, byte-identical on reruns); reading goes
through `megatron.core.datasets.indexed_dataset.IndexedDataset`, so what
training sees is exactly what megatron-core would.

.idx layout (little endian): b"MMIDIDX\\x00\\x00", u64 version 1, u8 dtype code,
u64 sequence count, u64 document count (+1), i32 lengths, i64 byte pointers,
i64 document boundaries (0, then the end of each document).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}
PARTIAL_SUFFIX = ".partial"


def token_dtype(vocab_size: int):
    """The smallest dtype holding every id, as megatron-core chooses it."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Appends one sequence per document to `<prefix>.bin.partial`; `publish` renames both files."""

    def __init__(self, prefix: Path, dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).type
        self._bin = open(self._partial(".bin"), "wb")
        self._lengths: list[np.ndarray] = []

    def _partial(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix + PARTIAL_SUFFIX)

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenation and their lengths."""
        self._bin.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finish(self) -> None:
        """Close the .bin and write the .idx, both still under their partial names."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._partial(".idx"), "wb") as idx:
            idx.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents)))
            idx.write(lengths.tobytes() + pointers.tobytes() + documents.tobytes())
            idx.flush()
            os.fsync(idx.fileno())

    def publish(self) -> None:
        for suffix in (".bin", ".idx"):
            os.replace(self._partial(suffix), self.prefix.with_name(self.prefix.name + suffix))

    def discard(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for suffix in (".bin", ".idx"):
            self._partial(suffix).unlink(missing_ok=True)


def open_indexed(prefix: Path):
    """megatron-core's reader of `<prefix>.bin/.idx`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), mmap=True)
