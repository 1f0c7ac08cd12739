"""Content checksums of files: the sha256 of every fixed-size block, taken while writing, checked in parallel.

A file's record is ``{"bytes": n, "block_bytes": B, "blocks": [sha256 hex of each B-byte block]}``
(the last block may be shorter; an empty file has no block). Blocks rather than one digest of the
whole file because

- a check can read and hash the blocks of many files on several threads at once (sha256 of one
  stream cannot be split), and hashlib and file reads release the GIL, so threads scale;
- a sampled check (some blocks of each file) is possible without a second record;
- a mismatch is named by byte range, not only by file.

`BlockDigest` takes the bytes as they are written, so recording costs no second read.
`record_digest` condenses a record into one hex digest (the file's content identity).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 16 * 2**20


class BlockDigest:
    """The block record of a byte stream, fed in pieces of any size with `update`."""

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes
        self._blocks: list[str] = []
        self._current = hashlib.sha256()
        self._filled = 0
        self._total = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self._total += len(view)
        while len(view):
            take = min(len(view), self.block_bytes - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self._blocks.append(self._current.hexdigest())
                self._current, self._filled = hashlib.sha256(), 0

    def record(self) -> dict:
        blocks = self._blocks + ([self._current.hexdigest()] if self._filled else [])
        return {"bytes": self._total, "block_bytes": self.block_bytes, "blocks": blocks}


def file_record(path: str | Path, block_bytes: int = BLOCK_BYTES) -> dict:
    """The block record of a file on disk (reads it once)."""
    digest = BlockDigest(block_bytes)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block_bytes), b""):
            digest.update(chunk)
    return digest.record()


def record_digest(record: dict) -> str:
    """One sha256 hex digest standing for the whole content a record describes."""
    text = f"{record['bytes']}:{record['block_bytes']}:" + ",".join(record["blocks"])
    return hashlib.sha256(text.encode()).hexdigest()


def is_record(value) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("bytes"), int)
        and isinstance(value.get("block_bytes"), int)
        and value["block_bytes"] > 0
        and isinstance(value.get("blocks"), list)
        and len(value["blocks"]) == -(-value["bytes"] // value["block_bytes"])
    )


@dataclass(frozen=True)
class Mismatch:
    """A file whose content is not what its record says."""

    path: Path
    problem: str  # e.g. "bytes 0-1023 differ (sha256 expected 3f2a..., found 9b1c...)"


def block_mismatch(path: Path, record: dict, block: int) -> Mismatch | None:
    """Block `block` of `path` against its recorded sha256."""
    size = record["block_bytes"]
    start = block * size
    try:
        with open(path, "rb") as f:
            f.seek(start)
            found = hashlib.sha256(f.read(size)).hexdigest()
    except OSError as err:
        return Mismatch(path, f"cannot be read ({err.strerror or err})")
    expected = record["blocks"][block]
    if found == expected:
        return None
    end = min(start + size, record["bytes"]) - 1
    return Mismatch(
        path,
        f"bytes {start}-{end} differ from the recorded content "
        f"(sha256 expected {expected[:16]}..., found {found[:16]}...)",
    )


class BlockCheck:
    """Checks (path, record, block) units on daemon threads; `wait` returns the first Mismatch or None.

    Daemon threads and a stop flag checked between blocks: a run that ends for another reason (an
    error, Ctrl-C) is never held up by hashing still in progress, which `stop` ends within a block.
    """

    def __init__(self, units: list[tuple[Path, dict, int]], threads: int):
        self.units = units
        self.bytes = sum(
            min(r["block_bytes"], r["bytes"] - b * r["block_bytes"]) for _, r, b in units
        )
        self._queue: queue.Queue = queue.Queue()
        for unit in units:
            self._queue.put(unit)
        self._stop = threading.Event()
        self._found: list[Mismatch] = []
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name=f"megamft-checksum-{i}")
            for i in range(max(1, min(threads, len(units))))
        ]

    def start(self) -> "BlockCheck":
        for thread in self._threads:
            thread.start()
        return self

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                path, record, block = self._queue.get_nowait()
            except queue.Empty:
                return
            mismatch = block_mismatch(path, record, block)
            if mismatch is not None:
                self._found.append(mismatch)
                self._stop.set()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def wait(self) -> Mismatch | None:
        for thread in self._threads:
            thread.join()
        return min(self._found, key=lambda m: str(m.path)) if self._found else None

    def stop(self) -> None:
        self._stop.set()


def hashing_threads() -> int:
    """Threads for a check: half the cores this process may use (the rest keep building the model), 1 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    return max(1, min(8, cores // 2))


def all_blocks(path: Path, record: dict) -> list[tuple[Path, dict, int]]:
    return [(path, record, b) for b in range(len(record["blocks"]))]


def folder_digests(paths: list[Path], threads: int | None = None) -> dict[str, str]:
    """{file name: record_digest} of files, hashed on several threads (for identities of whole folders)."""
    results: dict[str, str] = {}
    failures: list[OSError] = []
    pending: queue.Queue = queue.Queue()
    for path in paths:
        pending.put(path)

    def work() -> None:
        while not failures:
            try:
                path = pending.get_nowait()
            except queue.Empty:
                return
            try:
                results[path.name] = record_digest(file_record(path))
            except OSError as err:
                failures.append(err)

    workers = [
        threading.Thread(target=work, daemon=True)
        for _ in range(max(1, min(threads or hashing_threads(), len(paths))))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return dict(sorted(results.items()))
