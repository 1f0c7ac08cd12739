"""megatron-core's indexed dataset format (.bin/.idx), written here and read with megatron's reader.

Writing is ours (streamed, atomic, byte-identical on reruns, each file's block
checksums taken as its bytes are written: platform/checksums.py); reading goes
through `megatron.core.datasets.indexed_dataset.IndexedDataset`, so what
training sees is exactly what megatron-core would. `read_index` parses an
.idx header without megatron, so a damaged file can be named before
megatron's reader fails on it with a bare numpy error.

.idx layout (little endian): b"MMIDIDX\\x00\\x00", u64 version 1, u8 dtype code,
u64 sequence count, u64 document count (+1), i32 lengths, i64 byte pointers,
i64 document boundaries (0, then the end of each document).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamft.errors import UserError
from megamft.platform.checksums import BlockDigest

_HEADER = b"MMIDIDX\x00\x00"
_FIELDS = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count
_DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
PARTIAL_SUFFIX = ".partial"


def token_dtype(cardinality: int):
    """The smallest dtype holding ids 0..cardinality-1, as megatron-core chooses it."""
    return np.uint16 if cardinality < 65500 else np.int32


class IndexedWriter:
    """Appends one sequence per document to `<prefix>.bin.partial`; `publish` renames both files."""

    def __init__(self, prefix: Path, dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).type
        self._range = np.iinfo(self.dtype)
        self._bin = open(self._partial(".bin"), "wb")
        self._lengths: list[np.ndarray] = []
        self._digests = {".bin": BlockDigest(), ".idx": BlockDigest()}

    def _partial(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix + PARTIAL_SUFFIX)

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenation and their lengths; refuses a value the dtype would wrap."""
        values = np.asarray(values)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if high > self._range.max or low < self._range.min:
            bad = high if high > self._range.max else low
            raise ValueError(
                f"{self.prefix.name}.bin: value {bad} does not fit its dtype "
                f"{np.dtype(self.dtype).name} (it would be stored wrapped); nothing was written"
            )
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._digests[".bin"].update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finish(self) -> None:
        """Close the .bin and write the .idx, both still under their partial names."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._partial(".idx"), "wb") as idx:
            for part in (
                _HEADER + _FIELDS.pack(1, _DTYPE_CODES[self.dtype], len(lengths), len(documents)),
                lengths.tobytes(),
                pointers.tobytes(),
                documents.tobytes(),
            ):
                idx.write(part)
                self._digests[".idx"].update(part)
            idx.flush()
            os.fsync(idx.fileno())

    def checksums(self) -> dict[str, dict]:
        """{file name: block record} of the .bin and .idx written (after `finish`)."""
        return {
            self.prefix.name + suffix: digest.record() for suffix, digest in self._digests.items()
        }

    def publish(self) -> None:
        for suffix in (".bin", ".idx"):
            os.replace(self._partial(suffix), self.prefix.with_name(self.prefix.name + suffix))

    def discard(self) -> None:
        """Remove the partial files; never raises (a full disk fails the close, not the clean-up)."""
        try:
            self._bin.close()  # flushes what is buffered, which fails again on a full disk
        except OSError:
            pass
        for suffix in (".bin", ".idx"):
            try:
                self._partial(suffix).unlink(missing_ok=True)
            except OSError:
                pass


@dataclass
class IndexInfo:
    """What an .idx file says about its .bin."""

    dtype: type
    lengths: np.ndarray  # int32 token count of each sequence (one sequence per document here)

    @property
    def bin_bytes(self) -> int:
        return int(self.lengths.sum(dtype=np.int64)) * np.dtype(self.dtype).itemsize


class DamagedIndex(UserError, ValueError):
    """An .idx file that is not a whole megatron index; the message says what is wrong."""


def read_index(path: Path) -> IndexInfo:
    """Parse and size-check an .idx file (raises DamagedIndex with the problem, FileNotFoundError if absent)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(_HEADER) + _FIELDS.size)
    if len(head) < len(_HEADER) + _FIELDS.size or not head.startswith(_HEADER):
        raise DamagedIndex("not a megatron index file (its header is missing or damaged)")
    version, code, sequences, documents = _FIELDS.unpack(head[len(_HEADER) :])
    if version != 1 or code not in _CODE_DTYPES:
        raise DamagedIndex(f"unknown index version {version} or dtype code {code}")
    expected = len(head) + sequences * (4 + 8) + documents * 8
    if size != expected:
        raise DamagedIndex(
            f"{size} bytes, but its header promises {expected} "
            f"({sequences} sequences): the file is truncated or damaged"
        )
    # A map, not a copy: a rank reads 10^8 lengths (400 MB) at start-up without holding them.
    lengths = (
        np.memmap(path, dtype=np.int32, mode="r", shape=(sequences,), offset=len(head))
        if sequences
        else np.zeros(0, dtype=np.int32)
    )
    return IndexInfo(_CODE_DTYPES[code], lengths)


def open_indexed(prefix: Path):
    """megatron-core's reader of `<prefix>.bin/.idx`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), mmap=True)
