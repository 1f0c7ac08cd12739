"""The training index: the documents of every training sequence of every data epoch, built once, shared.

A data epoch's rows (mixing.TaskMixture's order, cut into sequences by data.mode) are computed by the
compiled index kernels, then, with a cache folder (index_cache.py), written by one process (the builder:
global rank 0 where the folder is shared by every node, a node's first rank where it is the node's own)
and memory-mapped by every rank; without one, each rank keeps its own copy in memory. Once a rank enters
epoch e, epoch e + 1 is prepared in a thread beside training (built and written by the builder; waited
for and checked by the others), so no step waits at an epoch boundary; only the epoch in use and the
next one are held, so memory does not grow with the number of epochs. A file that is damaged or belongs
to other data is never used: the builder rebuilds it, a reader waits for the rebuilt one (or, when the
builder could not write it, builds its own copy in memory).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from megamft.data import index_kernels
from megamft.data.index_cache import IndexCache, IndexFileProblem, MissingIndexFile
from megamft.data.mixing import TaskMixture
from megamft.data.sequences import Rows, rows_of_sizes

log = logging.getLogger("megamft")
FAILED = ".failed"  # <epoch file>.failed: the builder could not write that epoch; readers build their own


def _nothing() -> None:
    return None


@dataclass
class IndexSharing:
    """Who writes the index cache and how the others wait for it (training's start-up decides)."""

    builder: bool = True
    """This process builds missing or damaged index files and writes them; the others read them."""
    wait: Callable[[], None] = _nothing
    """Returns once every builder has written the start-up files (a barrier of every rank). Every rank
    calls it exactly once, also when its own start-up failed."""
    speaks: bool = True
    """This process logs what the cache does (training's logging rank)."""
    use_cache: bool = True
    """False where the cache folder cannot be written: every rank builds the index in memory."""
    poll_s: float = 0.05
    """How often a reader looks for a file its builder has not written yet (doubling up to 1 s)."""
    patience_s: float = 3600.0
    """How long a reader waits for a file before it builds its own copy in memory (a builder that is gone)."""


def epoch_rows(
    mixture: TaskMixture,
    lengths: list[np.ndarray],
    mode: str,
    seq_length: int,
    window: int,
    seed: int,
    epoch: int,
) -> Rows:
    """The sequences of data epoch `epoch` (each task's document lengths in `lengths`)."""
    tasks, docs, sizes = index_kernels.interleave(
        mixture.epoch_tasks(epoch), mixture.epoch_streams(epoch), lengths, seq_length
    )
    return rows_of_sizes(tasks, docs, sizes, mode, seq_length, window, seed + epoch)


class EpochSource:
    """Epoch rows: built in memory, or from the cache (written by the builder, read by the others)."""

    def __init__(
        self, build: Callable[[int], Rows], cache: IndexCache | None, sharing: IndexSharing
    ):
        self._build, self.cache, self.sharing = build, cache, sharing

    def obtain(self, epoch: int) -> Rows:
        if self.cache is None:
            return self._checked(self._build(epoch))
        return self._built(epoch) if self.sharing.builder else self._read(epoch)

    @staticmethod
    def _checked(rows: Rows) -> Rows:
        if len(rows) == 0:
            raise ValueError(
                "a data epoch has no sequence: check data.epoch_samples and the task weights"
            )
        return rows

    def _say(self, message: str, *args) -> None:
        if self.sharing.speaks:
            log.warning(message, *args)

    def _built(self, epoch: int) -> Rows:
        name = IndexCache.epoch_name(epoch)
        try:
            return _read_epoch(self.cache, epoch)
        except MissingIndexFile:
            pass
        except IndexFileProblem as err:
            self._say("%s; building it again", err)
        started = time.perf_counter()
        rows = self._checked(self._build(epoch))
        try:
            self.cache.write(name, "epoch", _arrays_of(rows), {"epoch": epoch})
            if self.sharing.speaks:
                log.info(
                    "training index: data epoch %d, %s sequences, built and written to %s in %.1f s",
                    epoch,
                    f"{len(rows):,}",
                    self.cache.folder,
                    time.perf_counter() - started,
                )
            self.cache.path(name + FAILED).unlink(missing_ok=True)
            return _read_epoch(self.cache, epoch, verify=False)  # mapped: no private copy kept
        except OSError as err:
            self._say(
                "the training index of data epoch %d could not be written to %s (%s): kept in memory; "
                "the other ranks build their own",
                epoch,
                self.cache.folder,
                err.strerror or err,
            )
            try:
                self.cache.path(name + FAILED).write_text(f"{err}\n")
            except OSError:
                pass
            return rows

    def _read(self, epoch: int) -> Rows:
        name = IndexCache.epoch_name(epoch)
        start, pause, problem = time.monotonic(), self.sharing.poll_s, None
        while time.monotonic() - start < self.sharing.patience_s:
            listed = self.cache.listed()
            if name in listed:
                try:
                    return _read_epoch(self.cache, epoch)
                except (
                    IndexFileProblem
                ) as err:  # the builder replaces a damaged file: wait for the new one
                    problem = err
            if name + FAILED in listed:
                break
            time.sleep(pause)
            pause = min(2 * pause, 1.0)
        self._say(
            "the training index of data epoch %d did not come from its builder (%s): built in memory "
            "here",
            epoch,
            problem or "no file written",
        )
        return self._checked(self._build(epoch))


def _arrays_of(rows: Rows) -> dict[str, np.ndarray]:
    arrays = {"tasks": rows.tasks, "docs": rows.docs}
    if rows.offsets is not None:
        arrays["offsets"] = rows.offsets
    return arrays


def _read_epoch(cache: IndexCache, epoch: int, verify: bool = True) -> Rows:
    name = IndexCache.epoch_name(epoch)
    file = cache.read(name, "epoch", verify)
    if file.extra.get("epoch") != epoch:
        raise IndexFileProblem(
            f"{cache.path(name)} holds data epoch {file.extra.get('epoch')}, not {epoch}"
        )
    arrays = file.arrays
    return Rows(arrays["tasks"], arrays["docs"], arrays.get("offsets"))


class _Ahead:
    """One epoch prepared in a daemon thread (a build killed at exit leaves only a partial file)."""

    def __init__(self, epoch: int, obtain: Callable[[int], Rows]):
        self.epoch, self._rows, self._error = epoch, None, None
        self._thread = threading.Thread(
            target=self._run, args=(obtain,), name=f"megamft-index-{epoch}", daemon=True
        )
        self._thread.start()

    def _run(self, obtain) -> None:
        try:
            self._rows = obtain(self.epoch)
        except BaseException as err:  # handed to the step that needs this epoch
            self._error = err

    def result(self) -> Rows:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._rows


class Lazy:
    """A value computed on first use, once, whichever thread asks first."""

    def __init__(self, compute: Callable):
        self._compute, self._value, self._lock = compute, None, threading.Lock()

    def get(self):
        with self._lock:
            if self._compute is not None:
                self._value, self._compute = self._compute(), None
            return self._value


@dataclass
class TrainIndex:
    """Training sequences of every data epoch, addressed by a global count of sequences consumed."""

    source: EpochSource
    quota: np.ndarray
    """Samples of each task per data epoch."""
    mixture_of: Lazy
    """The task mixture (made when first asked: readers of the cache never need it to train)."""
    prepare_ahead: bool = True
    _starts: list[int] = field(default_factory=lambda: [0])
    _current: tuple[int, Rows] | None = None
    _ahead: _Ahead | None = None

    @property
    def mixture(self) -> TaskMixture:
        return self.mixture_of.get()

    def epoch(self, epoch: int) -> Rows:
        """The rows of data epoch `epoch`; entering it starts preparing the next one."""
        if self._current is not None and self._current[0] == epoch:
            return self._current[1]
        if self._ahead is not None and self._ahead.epoch == epoch:
            rows, self._ahead = self._ahead.result(), None
        else:
            rows = self.source.obtain(epoch)
        self._current = (epoch, rows)
        if self.prepare_ahead and (self._ahead is None or self._ahead.epoch != epoch + 1):
            self._ahead = _Ahead(epoch + 1, self.source.obtain)
        return rows

    def _locate(self, position: int) -> tuple[int, int]:
        while self._starts[-1] <= position:
            self._starts.append(self._starts[-1] + len(self.epoch(len(self._starts) - 1)))
        epoch = bisect.bisect_right(self._starts, position) - 1
        return epoch, position - self._starts[epoch]

    def row(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The sequence at a global position (a count of sequences consumed since the start)."""
        epoch, r = self._locate(position)
        return self.epoch(epoch).row(r)

    def sequences_per_epoch(self) -> int:
        return len(self._peek(0))

    def tasks_of_first(self, sequences: int) -> set[int]:
        """The tasks with a sample in the first `sequences` sequences (at most one data epoch's)."""
        rows = self._peek(0)
        count = min(sequences, len(rows))
        return set(np.unique(rows.tasks[: rows.start(count)]).tolist())

    def _peek(self, epoch: int) -> Rows:
        """An epoch's rows without entering it (the one in use stays in use)."""
        if self._current is not None and self._current[0] == epoch:
            return self._current[1]
        if self._current is None:
            return self.epoch(epoch)
        return self.source.obtain(epoch)
