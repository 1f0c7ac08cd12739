"""The files of a preprocessed folder against the checksums megamft-preprocess recorded as it wrote them.

integrity.py checks what is cheap (every file present, the indexes consistent with their .bin,
each other and the manifest's counts); this checks the content, on background threads,
so that a file edited in place, swapped with another task's or damaged on disk is named before
training reads it. Modes (data.verify):

  full     every block of every file. Started when the data is opened, the hashing overlaps
           building the model and loading the checkpoint; training waits for its result before
           validation and the first step. sha256 runs at about 0.7 GB/s per core on a 2-core EPYC
           VM, on up to 8 threads (benchmarks/content_hashing.py): a 100 GB corpus takes tens of
           seconds to a few minutes, mostly hidden behind a large model's start-up.
  sampled  the indexes and task-id files whole (small), and of every other file its first and
           last block and one block in every SAMPLE_EVERY at random (another sample each start):
           a swapped or rebuilt file is found, an in-place edit only if a sampled block holds it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from megamft.data.manifest import CHECKSUMS, rerun_hint, task_files
from megamft.platform.checksums import BlockCheck, Mismatch, all_blocks, hashing_threads

MODES = ("full", "sampled")
SAMPLE_EVERY = 64


def damaged_message(folder: Path, mismatch: Mismatch) -> str:
    return (
        f"{mismatch.path}: {mismatch.problem}: the file is not the one megamft-preprocess wrote (edited, "
        f"replaced or damaged since); {rerun_hint(folder)}"
    )


def _whole(name: str) -> bool:
    return name.endswith(".idx") or name.endswith("_task_id.bin")


def _sampled(path: Path, record: dict, rng: random.Random) -> list:
    blocks = all_blocks(path, record)
    if _whole(path.name) or len(blocks) <= 2:
        return blocks
    middle = blocks[1:-1]
    return [blocks[0], *rng.sample(middle, -(-len(middle) // SAMPLE_EVERY)), blocks[-1]]


class DataCheck:
    """Hashes the manifest's files on background threads from construction; `problem` waits for the answer."""

    def __init__(
        self, folder: Path, manifest: dict, mode: str = "full", threads: int | None = None
    ):
        if mode not in MODES:
            raise ValueError(f"unknown verification mode {mode!r}; one of {', '.join(MODES)}")
        self.folder, self.mode = Path(folder), mode
        records = manifest[CHECKSUMS]
        files = [name for entry in manifest["tasks"] for name in task_files(entry)]
        rng = random.Random()
        units = []
        for name in files:
            path = self.folder / name
            units += (
                all_blocks(path, records[name])
                if mode == "full"
                else _sampled(path, records[name], rng)
            )
        self.files = len(files)
        self._started = time.perf_counter()
        self._check = BlockCheck(units, threads or hashing_threads()).start()
        self.seconds: float | None = None  # from the start to the end of the hashing
        self.waited = 0.0  # of which the caller of `problem` waited

    @property
    def bytes(self) -> int:
        return self._check.bytes

    def problem(self) -> str | None:
        """Waits for the check to end: None when every file is as recorded, else what is wrong, naming the file."""
        asked = time.perf_counter()
        mismatch = self._check.wait()
        if self.seconds is None:
            self.seconds, self.waited = (
                time.perf_counter() - self._started,
                time.perf_counter() - asked,
            )
        return None if mismatch is None else damaged_message(self.folder, mismatch)

    def stop(self) -> None:
        self._check.stop()

    def summary(self) -> str:
        hint = (
            "; data.verify=sampled reads less" if self.mode == "full" and self.waited >= 10 else ""
        )
        return (
            f"{self.files} data files checked against their checksums ({self.mode}: "
            f"{self.bytes / 2**20:.1f} MiB hashed in {self.seconds or 0:.1f} s, training waited "
            f"{self.waited:.1f} s{hint})"
        )
