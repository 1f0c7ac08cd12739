"""The training index (megamft.data.train_index): the compiled kernels against their Python reference, every
epoch against the previous index's algorithm, exact resume with or without the cache, damaged or foreign
cache files rebuilt and never used, the next epoch prepared ahead, memory bounded over epochs, and the
one-writer rule over real processes."""

import gc
import logging
import tracemalloc

import numpy as np
import pytest
from data_fixtures import as_line, run_preprocess

from megamft.config import load_config
from megamft.data import index_kernels
from megamft.data.dataset import load_data
from megamft.data.index_cache import IndexCache
from megamft.data.packing import best_fit_groups, next_fit_groups
from megamft.data.sequences import MODES
from megamft.data.train_index import IndexSharing
from megamft.testing.distributed import launch

needs_compiler = pytest.mark.skipif(
    not index_kernels.compiled(), reason="no C compiler: the Python path runs alone"
)


# ---------------------------------------------------------------- the previous index, as the reference


def _old_stream(docs, seed, task, start, stop):
    """mixing.TaskMixture._task_stream before the compiled index (int64 permutations of whole passes)."""
    n = len(docs)
    passes = range(start // n, (stop - 1) // n + 1) if stop > start else range(0)
    stream = (
        np.concatenate(
            [docs[np.random.default_rng([seed, 104729, task, p]).permutation(n)] for p in passes]
        )
        if passes
        else np.zeros(0, dtype=np.int64)
    )
    offset = (start // n) * n if passes else 0
    return stream[start - offset : stop - offset]


def _old_epoch_rows(train_docs, quota, lengths, mode, seq, window, seed, epoch):
    """The previous TrainSequences epoch: mixing with int64 arrays, then the Python packers."""
    rng = np.random.default_rng([seed, 1299709, epoch])
    tasks = rng.permutation(np.repeat(np.arange(len(quota)), quota))
    docs = np.empty(len(tasks), dtype=np.int64)
    for task, q in enumerate(quota):
        docs[tasks == task] = _old_stream(
            train_docs[task], seed, task, epoch * int(q), (epoch + 1) * int(q)
        )
    sizes = np.clip(
        np.array([lengths[t][d] for t, d in zip(tasks, docs)], dtype=np.int64) - 1, 0, seq
    )
    keep = np.flatnonzero(sizes > 0)
    tasks, docs, sizes = tasks[keep], docs[keep], sizes[keep]
    if mode in ("pad", "dynamic"):
        groups = [[i] for i in range(len(tasks))]
    elif mode == "pack":
        groups = best_fit_groups(sizes, seq, window, np.random.default_rng(seed + epoch))
    else:
        groups = next_fit_groups(sizes, seq)
    return [tuple(zip(tasks[g].tolist(), docs[g].tolist())) for g in groups]


def _rows(data, start, count):
    return [
        tuple(zip(t.tolist(), d.tolist()))
        for t, d in (data.train.row(p) for p in range(start, start + count))
    ]


# ---------------------------------------------------------------- kernels


@needs_compiler
def test_compiled_kernels_give_what_the_python_reference_gives():
    for trial in range(40):
        g = np.random.default_rng(trial)
        capacity = int(g.choice([5, 64, 300, 2048, 70_000]))
        n = int(g.integers(0, 2500))
        sizes = (g.geometric(0.03, n) if trial % 2 else g.integers(1, capacity + 1, n)).clip(
            1, capacity
        )
        window = int(g.choice([1, 7, 100, 1000, 10**6]))
        flat, offsets = index_kernels.best_fit(
            sizes.astype(np.int32), capacity, window, np.random.default_rng(trial)
        )
        groups = best_fit_groups(sizes, capacity, window, np.random.default_rng(trial))
        assert flat.tolist() == [i for group in groups for i in group], trial
        assert np.diff(offsets).tolist() == [len(group) for group in groups], trial
        assert np.diff(index_kernels.next_fit(sizes.astype(np.int32), capacity)).tolist() == [
            len(group) for group in next_fit_groups(sizes, capacity)
        ], trial
        lengths = [
            g.integers(0, 3 * capacity, int(g.integers(1, 50))).astype(np.int32) for _ in range(3)
        ]
        streams = [g.integers(0, len(a), int(g.integers(0, 40))).astype(np.int32) for a in lengths]
        tasks = g.permutation(np.repeat(np.arange(3, dtype=np.uint16), [len(s) for s in streams]))
        compiled = index_kernels.interleave(tasks, streams, lengths, capacity)
        reference = index_kernels._interleave_python(tasks, streams, lengths, capacity)
        assert all(np.array_equal(a, b) for a, b in zip(compiled, reference)), trial


# ---------------------------------------------------------------- a small preprocessed folder


def _sample(words: int, i: int) -> str:
    return as_line(
        [("user", f"q{i}"), ("assistant", " ".join(f"w{i}x{k}" for k in range(words)))], "messages"
    )


@needs_compiler
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_the_compiled_shuffle_is_numpys_draw_for_draw(dtype):
    """index_kernels.shuffle against numpy's Generator.shuffle: the same order and the same generator state
    after it (the next draws agree), from a state holding a spare 32-bit draw as well as from a fresh one."""
    for n in (0, 1, 2, 3, 17, 1000, 100_003):
        for spare in (False, True):
            ours, theirs = np.random.default_rng([n, 5]), np.random.default_rng([n, 5])
            if spare:  # a generator whose next 32-bit draw is held over from a 64-bit one
                ours.integers(0, 2**31, dtype=np.int32), theirs.integers(0, 2**31, dtype=np.int32)
            x = (np.arange(n) * 7 % max(n, 1)).astype(dtype)
            expected = x.copy()
            theirs.shuffle(expected)
            index_kernels.shuffle(ours, x)
            assert x.tolist() == expected.tolist()
            assert (
                ours.integers(0, 2**62, size=4).tolist()
                == theirs.integers(0, 2**62, size=4).tolist()
            )
    assert (
        index_kernels.permutation(np.random.default_rng(3), 50).tolist()
        == np.random.default_rng(3).permutation(50).tolist()
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index")
    g = np.random.default_rng(0)
    tasks = {
        name: [_sample(int(w), 1000 * t + i) for i, w in enumerate(g.integers(1, 30, size))]
        for t, (name, size) in enumerate([("big", 150), ("mid", 60), ("small", 12)])
    }
    out, _ = run_preprocess(tmp, tasks, dedup=False)
    return out


def _config(folder, cache, *overrides):
    return load_config(
        None,
        [
            "data.source=indexed",
            f"data.path={folder}",
            f"data.index_cache={cache}",
            "data.seq_length=64",
            "data.valid_samples_per_task=3",
            "data.pack_window=16",
            *overrides,
        ],
    ).data


def _quiet(data):
    """No background build left running when a test ends (it would compete for the CPU)."""
    if data.train._ahead is not None:
        data.train._ahead.result()
    return data


@pytest.mark.parametrize("mode", MODES)
def test_every_epoch_is_the_previous_index_s(folder, tmp_path, mode):
    """Upsampled and downsampled tasks over four epochs, from the cache and in memory."""
    cfg = _config(
        folder,
        tmp_path / "cache",
        f"data.mode={mode}",
        "data.task_sampling=uniform",
        "data.epoch_samples=90",
    )
    for sharing in (IndexSharing(), IndexSharing(use_cache=False)):
        data = load_data(cfg, sharing)
        mixture = data.train.mixture
        lengths = [store.lengths for store in data.stores]
        position = 0
        for epoch in range(4):
            expected = _old_epoch_rows(
                [d.astype(np.int64) for d in mixture.train_docs],
                mixture.quota,
                lengths,
                mode,
                64,
                16,
                cfg.seed,
                epoch,
            )
            assert _rows(data, position, len(expected)) == expected, (epoch, sharing.use_cache)
            position += len(expected)
        _quiet(data)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("epoch-*.idx"))[:4] == [
        IndexCache.epoch_name(e) for e in range(4)
    ]


def test_resume_gives_the_same_rows_with_or_without_the_cache(folder, tmp_path):
    cfg = _config(folder, tmp_path / "cache", "data.epoch_samples=50")
    first = load_data(cfg)
    stream = _rows(first, 0, 200)  # several epochs
    _quiet(first)
    for start in (0, 37, 121):
        resumed = load_data(cfg)  # the cache written by `first`
        assert _rows(resumed, start, 200 - start) == stream[start:]
        _quiet(resumed)
    for cached in (tmp_path / "cache").rglob("*.idx"):
        cached.unlink()
    assert _rows(_quiet(load_data(cfg)), 121, 79) == stream[121:]  # rebuilt
    assert _rows(_quiet(load_data(cfg, IndexSharing(use_cache=False))), 121, 79) == stream[121:]


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "a flipped byte": lambda cache, other: _flip_payload_byte(cache / IndexCache.epoch_name(1)),
    "truncated": lambda cache, other: cache.joinpath(IndexCache.epoch_name(1)).write_bytes(
        cache.joinpath(IndexCache.epoch_name(1)).read_bytes()[:-8]
    ),
    "another epoch's file": lambda cache, other: cache.joinpath(
        IndexCache.epoch_name(1)
    ).write_bytes(cache.joinpath(IndexCache.epoch_name(2)).read_bytes()),
    "another seed's file": lambda cache, other: cache.joinpath(
        IndexCache.epoch_name(1)
    ).write_bytes(other.joinpath(IndexCache.epoch_name(1)).read_bytes()),
    "a damaged plan": lambda cache, other: _flip_payload_byte(cache / "plan.idx"),
    "not an index file": lambda cache, other: cache.joinpath("split.idx").write_text("hello"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_foreign_cache_file_is_rebuilt_never_used(folder, tmp_path, damage, caplog):
    cfg = _config(folder, tmp_path / "cache", "data.epoch_samples=60")
    reference = load_data(cfg, IndexSharing(use_cache=False))
    expected = _rows(reference, 0, 150)
    _quiet(reference)
    first = load_data(cfg)
    _rows(first, 0, 150)
    _quiet(first)
    other = load_data(_config(folder, tmp_path / "cache", "data.epoch_samples=60", "data.seed=7"))
    _rows(other, 0, 150)
    _quiet(other)
    cache, other_cache = (
        next(
            p.parent
            for p in (tmp_path / "cache").rglob("key.json")
            if f'"seed": {seed}' in p.read_text()
        )
        for seed in (cfg.seed, 7)
    )
    DAMAGE[damage](cache, other_cache)
    with caplog.at_level(logging.WARNING, logger="megamft"):
        again = load_data(cfg)
        assert _rows(again, 0, 150) == expected
        _quiet(again)
    named = [r.getMessage() for r in caplog.records if str(cache) in r.getMessage()]
    assert named and (
        "building it again" in named[0] or "building the training index again" in named[0]
    ), named
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megamft"):
        assert _rows(_quiet(load_data(cfg)), 0, 150) == expected
    assert not caplog.records  # rebuilt whole: read as it is now


def test_the_next_epoch_is_prepared_before_it_is_needed(folder, tmp_path):
    cfg = _config(folder, tmp_path / "cache", "data.epoch_samples=40")
    data = load_data(cfg)
    epoch1 = next(tmp_path.joinpath("cache").rglob("key.json")).parent / IndexCache.epoch_name(1)
    per_epoch = data.train.sequences_per_epoch()
    data.train.row(0)
    data.train._ahead.result()  # the thread started when epoch 0 was entered
    assert epoch1.is_file()
    stamp = epoch1.stat().st_mtime_ns
    data.train.row(per_epoch)  # epoch 1: read as prepared, not built again
    assert epoch1.stat().st_mtime_ns == stamp
    _quiet(data)


def test_memory_does_not_grow_with_the_number_of_epochs(folder, tmp_path):
    """Only the epoch in use and the next one are held (the previous index kept every epoch's rows)."""
    cfg = _config(folder, tmp_path / "cache", "data.epoch_samples=2000", "data.mode=pad")
    for sharing in (IndexSharing(use_cache=False), IndexSharing()):
        data = load_data(cfg, sharing)
        per_epoch = data.train.sequences_per_epoch()
        tracemalloc.start()
        held = []
        for epoch in range(12):
            data.train.row(epoch * per_epoch)
            data.train._ahead.result()
            gc.collect()  # ctypes' and numpy's small reference cycles (training collects every gc_interval steps)
            held.append(_array_sized_bytes(tracemalloc.take_snapshot(), per_epoch))
        tracemalloc.stop()
        one_epoch = per_epoch * (2 + 4)  # uint16 task and int32 document per row
        assert held[-1] - held[2] < one_epoch, (sharing.use_cache, held, one_epoch)


def _array_sized_bytes(snapshot, per_epoch: int) -> int:
    """Bytes held in blocks at least as large as one epoch's smallest array (per_epoch uint16 tasks): what
    keeping an epoch's rows would grow. Small objects are left out: a few dozen bytes of ctypes and thread
    bookkeeping per epoch come and go with the machine's load, and are not an epoch's index."""
    return sum(trace.size for trace in snapshot.traces if trace.size >= 2 * per_epoch)


def test_one_process_per_folder_writes_the_index_and_every_rank_reads_the_same_rows(
    folder, tmp_path
):
    """Two ranks seeing one folder: rank 0 writes, rank 1 reads. Two ranks with a folder each (two nodes'
    own disks): each writes its own. Every rank trains on the same rows as a process alone."""
    import data_jobs

    cfg = _config(folder, tmp_path / "alone", "data.epoch_samples=50")
    expected = _rows(_quiet(load_data(cfg, IndexSharing(use_cache=False))), 0, 120)
    shared = launch(
        data_jobs.index_rows,
        2,
        {"folder": str(folder), "caches": [str(tmp_path / "shared")] * 2, "count": 120},
        timeout=240,
    )
    assert [r["builder"] for r in shared] == [True, False]
    assert all(r["rows"] == expected for r in shared)
    own = launch(
        data_jobs.index_rows,
        2,
        {
            "folder": str(folder),
            "caches": [str(tmp_path / "node0"), str(tmp_path / "node1")],
            "count": 120,
        },
        timeout=240,
    )
    assert [r["builder"] for r in own] == [True, True]
    assert all(r["rows"] == expected for r in own)
    for node in ("node0", "node1"):
        assert any((tmp_path / node).rglob(IndexCache.epoch_name(1)))
