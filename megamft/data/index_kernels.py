"""The training index's per-document loops: compiled C (index_kernels.c) through ctypes, Python where no C
compiler is found.

The C file is built once per machine with the system's compiler (`$CC`, else `cc`) into a folder named
after its bytes and the compiler's version, under the kernels root ($MEGAMFT_KERNELS_DIR, else
~/.cache/megamft/kernels), written under a temporary name and renamed, so a build killed at any point
leaves nothing that looks complete and concurrent builders never see half a library. It needs no Python
headers and releases the GIL while it runs (ctypes does), so the next epoch's index is built in a
thread beside training. Without a compiler the same results come from the Python reference
(packing.best_fit_groups, packing.next_fit_groups, a numpy interleave), much slower at scale; a
warning says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger("megamft")
SOURCE = Path(__file__).with_name("index_kernels.c")
LIBRARY = "index_kernels.so"
ROOT_ENV = (
    "MEGAMFT_KERNELS_DIR"  # the same root as the fused loss kernels (megamft.loss.kernel_cache)
)

_i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_u16p = np.ctypeslib.ndpointer(np.uint16, flags="C_CONTIGUOUS")
_i64 = ctypes.c_int64
_SIGNATURES = {
    "megamft_interleave": [
        _u16p,
        _i64,
        ctypes.c_int32,
        _i32p,
        _i64p,
        _i64p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int32,
        _u16p,
        _i32p,
        _i32p,
    ],
    "megamft_next_fit": [_i32p, _i64, ctypes.c_int32, _i64p],
    "megamft_best_fit": [
        _i32p,
        _i64,
        ctypes.c_int32,
        _i64,
        _i32p,
        _i32p,
        _i32p,
        _i64p,
        ctypes.POINTER(_i64),
    ],
    "megamft_group_items": [_i32p, _i32p, _i64, _i32p, _i64, _i32p, _i64p],
    "megamft_shuffle": [
        ctypes.c_void_p,
        _i64,
        _i64,
        np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS"),
    ],
}


def kernels_root() -> Path:
    """$MEGAMFT_KERNELS_DIR, else $XDG_CACHE_HOME/megamft/kernels, else ~/.cache/megamft/kernels."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megamft" / "kernels"


def _compiler() -> tuple[str, str] | None:
    """(the C compiler's path, its version line), or None when there is none."""
    found = shutil.which(os.environ.get("CC") or "cc")
    if found is None:
        return None
    try:
        version = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return found, (version.splitlines() or [""])[0]


def _build(folder: Path, compiler: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / LIBRARY
    partial = folder / f"{LIBRARY}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        subprocess.run(
            [compiler, "-O3", "-shared", "-fPIC", "-std=c99", "-o", str(partial), str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, _i64
    return library


class _Kernels:
    """The compiled library, built or loaded on first use; None where it cannot be."""

    def __init__(self):
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._tried = False

    def library(self) -> ctypes.CDLL | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._library = self._find()
            return self._library

    @staticmethod
    def _find() -> ctypes.CDLL | None:
        if os.environ.get("MEGAMFT_INDEX_KERNELS") == "python":
            return None
        compiler = _compiler()
        if compiler is None:
            log.warning(
                "no C compiler (cc, or $CC): the training index is built in Python, much slower for "
                "millions of samples; install gcc or clang to build it in C"
            )
            return None
        key = hashlib.sha256(
            SOURCE.read_bytes() + compiler[1].encode() + os.uname().machine.encode()
        )
        folder = kernels_root() / f"data-index-{key.hexdigest()[:16]}"
        try:
            if (folder / LIBRARY).is_file():
                try:
                    return _load(folder / LIBRARY)
                except OSError:
                    pass  # not a loadable library (another machine's, damaged): built again
            return _load(_build(folder, compiler[0]))
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or err
            log.warning(
                "the training index's C kernels could not be built in %s (%s): it is built in Python, "
                "much slower for millions of samples; set %s to a writable folder",
                folder,
                str(detail).strip()[:500],
                ROOT_ENV,
            )
            return None


KERNELS = _Kernels()


def compiled() -> bool:
    """Whether the C kernels are in use (built or loaded now if needed)."""
    return KERNELS.library() is not None


def _check(code: int, what: str) -> int:
    if code == -1:
        raise MemoryError(f"the training index's {what} ran out of memory")
    return code


# ---------------------------------------------------------------- the operations, C or Python

_MASK64 = (1 << 64) - 1


def shuffle(rng: np.random.Generator, x: np.ndarray) -> None:
    """rng.shuffle(x) for a 1-d contiguous array of 2-, 4- or 8-byte items, in place: the same permutation
    and the same generator state after it (rng must be numpy's PCG64 Generator, as default_rng gives)."""
    library = KERNELS.library()
    if (
        library is None
        or x.ndim != 1
        or not x.flags.c_contiguous
        or x.itemsize not in (2, 4, 8)
        or rng.bit_generator.state.get("bit_generator") != "PCG64"
    ):
        rng.shuffle(x)
        return
    with rng.bit_generator.lock:
        state = rng.bit_generator.state
        pcg = state["state"]
        words = np.array(
            [
                pcg["state"] >> 64,
                pcg["state"] & _MASK64,
                pcg["inc"] >> 64,
                pcg["inc"] & _MASK64,
                state["has_uint32"],
                state["uinteger"],
            ],
            dtype=np.uint64,
        )
        library.megamft_shuffle(x.ctypes.data, len(x), x.itemsize, words)
        w = [int(v) for v in words]
        rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
            "has_uint32": w[4],
            "uinteger": w[5],
        }


def permutation(rng: np.random.Generator, x: np.ndarray | int) -> np.ndarray:
    """rng.permutation(x) (an int: of arange(x), int32 below 2^31): the same values, through `shuffle`."""
    if isinstance(x, (int, np.integer)):
        x = np.arange(int(x), dtype=np.int32 if x < 2**31 else np.int64)
    else:
        x = np.array(x)
    shuffle(rng, x)
    return x


def interleave(
    tasks: np.ndarray, streams: list[np.ndarray], lengths: list[np.ndarray], seq_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tasks, docs, sizes) of the documents of an epoch: the k-th occurrence of task t in `tasks` is
    `streams[t][k]`; sizes = `clip(length - 1, 0, seq_length)`; documents of size 0 are left out."""
    library = KERNELS.library()
    if library is None:
        return _interleave_python(tasks, streams, lengths, seq_length)
    tasks = np.ascontiguousarray(tasks, dtype=np.uint16)
    flat = (
        np.concatenate(streams).astype(np.int32, copy=False) if streams else np.zeros(0, np.int32)
    )
    stops = np.cumsum([len(s) for s in streams], dtype=np.int64)
    starts = np.ascontiguousarray(stops - [len(s) for s in streams], dtype=np.int64)
    arrays = [
        np.ascontiguousarray(a, dtype=np.int32) for a in lengths
    ]  # megatron's are int32 maps already
    pointers = (ctypes.c_void_p * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])
    out_tasks = np.empty(len(tasks), np.uint16)
    docs, sizes = np.empty(len(tasks), np.int32), np.empty(len(tasks), np.int32)
    kept = library.megamft_interleave(
        tasks,
        len(tasks),
        len(streams),
        flat,
        starts,
        stops,
        pointers,
        int(seq_length),
        out_tasks,
        docs,
        sizes,
    )
    if kept < 0:
        raise ValueError("a task occurs more often in the epoch than its stream holds")
    return out_tasks[:kept], docs[:kept], sizes[:kept]


def _interleave_python(tasks, streams, lengths, seq_length):
    docs = np.empty(len(tasks), dtype=np.int32)
    sizes = np.empty(len(tasks), dtype=np.int32)
    for task, stream in enumerate(streams):
        where = tasks == task
        if int(where.sum()) > len(stream):
            raise ValueError("a task occurs more often in the epoch than its stream holds")
        docs[where] = stream[: int(where.sum())]
        sizes[where] = np.clip(
            np.asarray(lengths[task])[stream[: int(where.sum())]].astype(np.int64) - 1,
            0,
            seq_length,
        )
    keep = sizes > 0
    return tasks[keep].astype(np.uint16), docs[keep], sizes[keep]


def next_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Offsets of next-fit bins over items in order (bin r holds items offsets[r]:offsets[r+1])."""
    library = KERNELS.library()
    if library is None:
        from megamft.data.packing import next_fit_groups

        return _offsets([len(g) for g in next_fit_groups(np.asarray(sizes), capacity)])
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    offsets = np.empty(len(sizes) + 1, dtype=np.int64)
    bins = library.megamft_next_fit(sizes, len(sizes), int(capacity), offsets)
    return offsets[: bins + 1].copy() if 2 * bins < len(sizes) else offsets[: bins + 1]


def best_fit(
    sizes: np.ndarray, capacity: int, window: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(flat, offsets): best-fit decreasing per window (packing.best_fit_groups), bin r holding the
    items flat[offsets[r]:offsets[r+1]]; the same bins, in the same order, as the Python reference."""
    library = KERNELS.library()
    if library is None:
        from megamft.data.packing import best_fit_groups

        groups = best_fit_groups(np.asarray(sizes), capacity, window, rng)
        flat = np.fromiter(
            (i for g in groups for i in g), dtype=np.int32, count=sum(map(len, groups))
        )
        return flat, _offsets([len(g) for g in groups])
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    n, window = len(sizes), max(int(window), 1)
    item_bin, order, emit = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int32)
    segments = np.empty(2 * (-(-n // window)) + 2, np.int64)
    count = _i64(0)
    bins = _check(
        library.megamft_best_fit(
            sizes, n, int(capacity), window, item_bin, order, emit, segments, ctypes.byref(count)
        ),
        "packing",
    )
    for start, length in segments[: 2 * count.value].reshape(-1, 2).tolist():
        if length > 1:  # a permutation of fewer than 2 draws nothing from the generator
            emit[start : start + length] = emit[start : start + length][rng.permutation(length)]
    flat, offsets = np.empty(n, np.int32), np.empty(bins + 1, np.int64)
    _check(
        library.megamft_group_items(item_bin, order, n, emit[:bins], bins, flat, offsets), "packing"
    )
    return flat, offsets


def _offsets(counts: list[int]) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets
