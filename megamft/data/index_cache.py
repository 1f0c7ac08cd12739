"""The training index's files on disk: named arrays behind a header, checked whole, memory-mapped.

A cache folder `<root>/<key[:16]>/` holds the files of one key (the sha256 of everything the index depends
on: the data, the data section, the format): `plan.idx` (the train/validation split, the validation rows,
what the data leaves out), `epoch-000000.idx`... (each data epoch's rows) and `key.json` (what the key was
made of, for people). Every file is

    MAGIC, u64 header length, header (JSON: format, key, kind, arrays, extra, payload bytes, crc32),
    zero padding to 4096, the arrays (each at a multiple of 64 bytes)

and is written under a `.partial` name and renamed, so no reader ever sees part of a file. A reader checks
the header (magic, format, the full key: a foreign file is refused), the size the header promises (a
truncated file is refused) and the crc32 of the payload (a damaged one is refused); the arrays are then
views of a read-only memory map, shared through the page cache by every process of a node.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"MEGAMFT-INDEX\n"
FORMAT = 1
"""Raised when the files' layout or the rules that compute them change: a new key, so a new folder."""
_LENGTH = struct.Struct("<Q")
_PAGE, _ALIGN = 4096, 64
_MAX_HEADER = 64 << 20
PARTIAL = ".partial"
STALE_PARTIAL_S = 3600.0
"""A partial file older than this was left by a killed writer: removed by the next builder."""


class IndexFileProblem(ValueError):
    """An index file that cannot be used; the message says why (missing, foreign, truncated, damaged)."""


class MissingIndexFile(IndexFileProblem):
    """No such file (yet)."""


@dataclass
class IndexFile:
    """The arrays (read-only views of the file's map) and the extra JSON of one index file."""

    arrays: dict[str, np.ndarray]
    extra: dict = field(default_factory=dict)


def write_index_file(
    path: Path, key: str, kind: str, arrays: dict[str, np.ndarray], extra: dict
) -> None:
    """Write `arrays` and `extra` to `path` atomically (a partial file renamed when complete)."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    layout, crc, offset = [], 0, 0
    for name, array in arrays.items():
        layout.append([name, array.dtype.str, int(array.size), offset])
        crc = zlib.crc32(memoryview(array).cast("B"), crc)
        padding = -array.nbytes % _ALIGN
        crc = zlib.crc32(bytes(padding), crc)
        offset += array.nbytes + padding
    header = json.dumps(
        {
            "format": FORMAT,
            "key": key,
            "kind": kind,
            "arrays": layout,
            "extra": extra,
            "payload": offset,
            "crc32": crc,
        }
    ).encode()
    start = _payload_start(len(header))
    partial = path.with_name(f"{path.name}{PARTIAL}.{socket.gethostname()}.{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            f.write(MAGIC + _LENGTH.pack(len(header)) + header)
            f.write(bytes(start - len(MAGIC) - _LENGTH.size - len(header)))
            for array in arrays.values():
                f.write(memoryview(array).cast("B"))
                f.write(bytes(-array.nbytes % _ALIGN))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _payload_start(header_bytes: int) -> int:
    return -(-(len(MAGIC) + _LENGTH.size + header_bytes) // _PAGE) * _PAGE


def read_index_file(path: Path, key: str, kind: str, verify: bool = True) -> IndexFile:
    """The file's arrays as views of a read-only map; IndexFileProblem if it is not a whole file of `key`.

    verify=False skips the crc32 of the payload (the header, key and size are checked always)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise MissingIndexFile(f"{path} does not exist") from None
    with handle:
        header = _header(handle, path)
        if header.get("format") != FORMAT or header.get("kind") != kind:
            raise IndexFileProblem(
                f"{path} is a {header.get('kind')!r} index file of format "
                f"{header.get('format')!r}, not a {kind!r} file of format {FORMAT}"
            )
        if header.get("key") != key:
            raise IndexFileProblem(
                f"{path} belongs to another data or data section (key "
                f"{str(header.get('key'))[:16]}..., expected {key[:16]}...)"
            )
        start = _payload_start(_LENGTH.unpack(_peek(handle, len(MAGIC), _LENGTH.size))[0])
        size, expected = os.fstat(handle.fileno()).st_size, start + int(header["payload"])
        if size != expected:
            raise IndexFileProblem(
                f"{path} has {size} bytes, its header promises {expected}: truncated or extended"
            )
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    payload = memoryview(mapped)[start:] if mapped is not None else memoryview(b"")
    if verify and zlib.crc32(payload) != header["crc32"]:
        raise IndexFileProblem(f"{path}: its contents do not match their checksum (damaged)")
    arrays = {
        name: np.frombuffer(mapped, dtype=np.dtype(dtype), count=count, offset=start + offset)
        if count
        else np.zeros(0, dtype=np.dtype(dtype))
        for name, dtype, count, offset in header["arrays"]
    }
    return IndexFile(arrays, header.get("extra") or {})


def _peek(handle, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


def _header(handle, path: Path) -> dict:
    head = handle.read(len(MAGIC) + _LENGTH.size)
    if len(head) < len(MAGIC) + _LENGTH.size or not head.startswith(MAGIC):
        raise IndexFileProblem(
            f"{path} is not a megamft index file (its header is missing or damaged)"
        )
    length = _LENGTH.unpack(head[len(MAGIC) :])[0]
    raw = handle.read(length) if length <= _MAX_HEADER else b""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
            raise ValueError
        int(header["payload"]), int(header["crc32"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IndexFileProblem(f"{path}: its header is damaged") from None
    return header


class IndexCache:
    """The cache folder of one key: where each file of the index lives, and how it is read and written."""

    def __init__(self, root: str | Path, key: str, description: dict):
        self.root, self.key, self.description = Path(root), key, description
        self.folder = self.root / key[:16]

    def path(self, name: str) -> Path:
        return self.folder / name

    @staticmethod
    def epoch_name(epoch: int) -> str:
        return f"epoch-{epoch:06d}.idx"

    def prepare(self) -> None:
        """The folder, its key.json, and no partial file left by a killed writer (builders only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = self.folder / "key.json"
        if not record.is_file():
            partial = record.with_name(f"key.json{PARTIAL}.{socket.gethostname()}.{os.getpid()}")
            partial.write_text(
                json.dumps({"key": self.key, **self.description}, indent=2, sort_keys=True) + "\n"
            )
            os.replace(partial, record)
        now = time.time()
        for leftover in self.folder.glob(f"*{PARTIAL}.*"):
            try:
                if now - leftover.stat().st_mtime > STALE_PARTIAL_S:
                    leftover.unlink()
            except OSError:
                pass

    def write(
        self, name: str, kind: str, arrays: dict[str, np.ndarray], extra: dict | None = None
    ) -> None:
        write_index_file(self.path(name), self.key, kind, arrays, extra or {})

    def read(self, name: str, kind: str, verify: bool = True) -> IndexFile:
        return read_index_file(self.path(name), self.key, kind, verify)

    def listed(self) -> set[str]:
        """The folder's file names, read from the folder itself (on NFS a fresh listing also refreshes the
        names a reader looked up before they existed)."""
        try:
            return set(os.listdir(self.folder))
        except OSError:
            return set()
