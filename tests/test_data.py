"""Training-time data: embedded corpus, task mixing, the four sequence modes, packed-attention isolation."""

from collections import Counter

import jobs
import numpy as np
import pytest

from megamft.config import DataConfig
from megamft.data.dataset import load_data
from megamft.data.mixing import TaskMixture, quotas, sampling_weights
from megamft.data.sequences import MODES, build_rows, collate
from megamft.data.stdlib_corpus import TASKS, build_corpus
from megamft.testing.distributed import launch


def _data(**fields):
    return load_data(
        DataConfig(
            **{"seq_length": 192, "max_samples_per_task": 40, "valid_samples_per_task": 4, **fields}
        )
    )


def test_corpus_has_every_task_and_is_deterministic():
    corpus = build_corpus(max_chars=400, samples_per_task=10, seed=3)
    assert set(corpus) == set(TASKS)
    for samples in corpus.values():
        assert len(samples) == 10
        for turns in samples:
            assert [t["role"] for t in turns] == ["human", "bot"]
            assert sum(len(t["content"]) for t in turns) <= 400
    assert (
        build_corpus(300, 5, seed=1) == build_corpus(300, 5, seed=1) != build_corpus(300, 5, seed=2)
    )


def _epoch_documents(data) -> list[tuple[int, int]]:
    """(task, doc) of every document of data epoch 0, read back through the sequences."""
    rows = [data.train.row(p) for p in range(data.train.sequences_per_epoch())]
    return [(int(t), int(d)) for tasks, docs in rows for t, d in zip(tasks, docs)]


@pytest.mark.parametrize("mode", MODES)
def test_an_epoch_holds_every_training_sample_once_and_no_validation_sample(mode):
    data = _data(mode=mode)
    seen = _epoch_documents(data)
    train = {
        (task, int(d)) for task, docs in enumerate(data.train.mixture.train_docs) for d in docs
    }
    assert len(seen) == len(set(seen)) and set(seen) == train and len(train) > 100
    valid = {
        (task, int(d))
        for task, rows in enumerate(data.valid.values())
        for r in range(len(rows))
        for d in rows.row(r)[1]
    }
    assert len(valid) == 3 * 4 and not valid & set(seen)


@pytest.mark.parametrize("mode", MODES)
def test_batches_keep_every_learned_token_shifted_onto_its_label(mode):
    data = _data(mode=mode)
    rows = data.train_rows(0, 8, 0, 1)
    expected_learned = sum(
        int(data.stores[t].get(d)[1][1:].sum()) for tasks, docs in rows for t, d in zip(tasks, docs)
    )
    batches = data.batches(rows, 4)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == expected_learned
    for b in batches:
        assert (
            b["labels"][:, :-1][b["loss_mask"][:, 1:] > 0]
            == b["tokens"][:, 1:][b["loss_mask"][:, 1:] > 0]
        ).all()
    tasks, docs = rows[0]
    ids, _ = data.stores[tasks[0]].get(docs[0])
    n = min(len(ids) - 1, 192)
    assert batches[0]["tokens"][0, :n].tolist() == ids[:n].tolist()
    assert batches[0]["labels"][0, :n].tolist() == ids[1 : n + 1].tolist()
    if mode == "dynamic":
        longest = max(
            int(data.stores[t].lengths[d]) - 1
            for tasks, docs in rows[:4]
            for t, d in zip(tasks, docs)
        )
        assert batches[0]["tokens"].shape[1] == -(-longest // 8) * 8
    else:
        assert batches[0]["tokens"].shape[1] == 192


def test_packed_rows_restart_positions_and_block_attention_across_documents():
    data = _data(mode="pack")
    row = next(r for r in data.train_rows(0, 16, 0, 1) if len(r[0]) >= 2)
    batch = collate([row], data.stores, "pack", 192, data.pad_id)
    first = int(data.stores[row[0][0]].lengths[row[1][0]]) - 1
    assert (
        batch["position_ids"][0, first].item() == 0
        and batch["position_ids"][0, first - 1].item() == first - 1
    )
    mask = batch["attention_mask"][0, 0]
    assert mask[first, first - 1].item() and not mask[first - 1, 0].item() and mask[0, 1].item()
    assert batch["sample_ids"][0, first].item() == 1 and batch["sample_ids"][0, 0].item() == 0
    lengths = [int(data.stores[t].lengths[d]) - 1 for t, d in zip(*row)]
    boundaries = np.cumsum([0, *lengths]).tolist()
    expected = boundaries + ([192] if boundaries[-1] < 192 else [])  # the padding block, if any
    assert batch["cu_seqlens"].tolist() == expected


def test_packed_documents_give_the_same_losses_as_alone():
    """A packed sequence's per-token losses equal each document run alone; without the mask they do not."""
    out = launch(jobs.packed_isolation, 1, timeout=240)[0]
    assert out["documents"] >= 6
    assert out["max_diff"] < 1e-5, out
    assert out["unmasked_max_diff"] > 1e-2, out


def test_order_is_deterministic_disjoint_across_dp_and_resumable():
    data, again = _data(), _data()
    global_rows = data.train_rows(16, 8, 0, 1)
    assert all(
        np.array_equal(a[1], b[1]) for a, b in zip(global_rows, again.train_rows(16, 8, 0, 1))
    )
    shards = [r for rank in range(4) for r in data.train_rows(16, 8, rank, 4)]
    assert [tuple(r[1]) for r in shards] == [
        tuple(r[1]) for r in global_rows
    ]  # disjoint, and the whole batch
    stream = [
        tuple(zip(*data.train_rows(8 * step, 8, 0, 1)[i])) for step in range(12) for i in range(8)
    ]
    resumed = _data()  # a fresh process resuming at 40 sequences consumed
    assert [
        tuple(zip(*r)) for step in range(5, 12) for r in resumed.train_rows(8 * step, 8, 0, 1)
    ] == stream[40:]


def test_sampling_weights_and_quotas():
    names = ["big", "mid", "small"]
    assert sampling_weights("proportional", [600, 300, 100], {}, names).tolist() == [0.6, 0.3, 0.1]
    assert np.allclose(sampling_weights("uniform", [600, 300, 100], {}, names), 1 / 3)
    assert sampling_weights("weights", [600, 300, 100], {"big": 1, "small": 3}, names).tolist() == [
        0.25,
        0,
        0.75,
    ]
    with pytest.raises(ValueError, match="unknown task"):
        sampling_weights("weights", [1, 1, 1], {"other": 1}, names)
    assert quotas(np.array([1 / 3] * 3), 1000).tolist() == [334, 333, 333]


def test_mixing_honours_weights_within_sampling_error_and_upsamples_whole_passes():
    sizes = [1000, 100, 10]
    mixture = TaskMixture(
        [np.arange(n) for n in sizes], np.array([0.5, 0.3, 0.2]), epoch_samples=2000, seed=5
    )
    tasks, docs = mixture.epoch(0)
    assert Counter(tasks.tolist()) == {0: 1000, 1: 600, 2: 400}
    head = Counter(tasks[:500].tolist())  # any window is a random sample of the mixture
    for task, p in enumerate([0.5, 0.3, 0.2]):
        assert abs(head[task] - 500 * p) < 4 * np.sqrt(500 * p * (1 - p)), head
    small = docs[tasks == 2]
    for start in range(0, 400, 10):  # 40 passes over the 10 small documents, each a permutation
        assert sorted(small[start : start + 10].tolist()) == list(range(10))
    big_next = mixture.epoch(1)[1][mixture.epoch(1)[0] == 0]
    assert sorted(np.concatenate([docs[tasks == 0], big_next]).tolist()) == sorted(
        list(range(1000)) * 2
    )


def test_downsampled_task_continues_where_the_last_epoch_stopped():
    mixture = TaskMixture(
        [np.arange(100), np.arange(30)], np.array([0.5, 0.5]), epoch_samples=40, seed=1
    )
    taken = np.concatenate([d[t == 0] for t, d in (mixture.epoch(e) for e in range(5))])
    assert sorted(taken.tolist()) == list(
        range(100)
    )  # 20 per epoch: every document once in 5 epochs


def test_packing_keeps_padding_small_and_order_random():
    data = _data(mode="pad", seq_length=1024, max_samples_per_task=300)
    tasks, docs = data.train.mixture.epoch(0)
    lengths = np.array([data.stores[t].lengths[d] for t, d in zip(tasks, docs)])
    useful = np.clip(lengths - 1, 0, 1024).sum()
    packed = build_rows(tasks, docs, lengths, "pack", 1024, window=1000, seed=0)
    concat = build_rows(tasks, docs, lengths, "concat", 1024, window=1000, seed=0)
    assert useful / (len(packed) * 1024) > 0.97
    assert len(packed) <= len(concat)
    first_docs = [packed.row(r)[1][0] for r in range(len(packed))]
    assert first_docs != sorted(first_docs)


def test_indexed_source_trains_the_same_data_as_preprocessed(tmp_path):
    """megamft-preprocess output of the embedded corpus, read through megatron's reader, gives the same sequences."""
    import json

    from megamft.data.preprocess import PreprocessOptions, preprocess

    corpus = build_corpus(184, 44, seed=1234)
    paths = {}
    for task, samples in corpus.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"chat_rounds": turns}) + "\n" for turns in samples))
        paths[task] = [str(path)]
    preprocess(
        PreprocessOptions(
            tasks=paths,
            out_dir=str(tmp_path / "out"),
            progress=False,
            dedup=False,
            max_seq_length=193,
            overlong="drop",
        )
    )
    memory = _data()
    indexed = _data(source="indexed", path=str(tmp_path / "out"))
    assert indexed.task_names == memory.task_names and indexed.vocab_size == memory.vocab_size
    for a, b in zip(
        memory.batches(memory.train_rows(0, 8, 0, 1), 4),
        indexed.batches(indexed.train_rows(0, 8, 0, 1), 4),
    ):
        for key in ("tokens", "labels", "loss_mask", "task_ids", "position_ids"):
            assert (a[key] == b[key]).all(), key


def _preprocessed_corpus(folder, **options):
    """The embedded corpus exported as JSON Lines and run through megamft-preprocess into `folder/out`."""
    import json

    from megamft.data.preprocess import PreprocessOptions, preprocess

    paths = {}
    for task, samples in build_corpus(184, 44, seed=1234).items():
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"chat_rounds": turns}) + "\n" for turns in samples))
        paths[task] = [str(path)]
    preprocess(
        PreprocessOptions(
            tasks=paths,
            out_dir=str(folder / "out"),
            progress=False,
            dedup=False,
            max_seq_length=193,
            overlong="drop",
            **options,
        )
    )
    return folder / "out"


def test_max_token_id_covers_every_sequence_of_both_sources(tmp_path):
    """The largest id a sequence can hold (padding included), for the trainer to check against the model."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    memory = _data()
    in_memory = max(
        int(store.get(d)[0].max()) for store in memory.stores for d in range(len(store.lengths))
    )
    assert memory.max_token_id == max(in_memory, memory.pad_id)
    out = _preprocessed_corpus(tmp_path)
    readers = [
        IndexedDataset(str(out / name)) for name in TASKS
    ]  # megatron's own; kept: arrays live in its map
    read_back = max(int(reader[d].max()) for reader in readers for d in range(len(reader)))
    assert _data(source="indexed", path=str(out)).max_token_id == max(read_back, memory.pad_id)
    manifest = json.loads((out / "manifest.json").read_text())
    for task in manifest[
        "tasks"
    ]:  # an output written before max_token_id was recorded: read from the files
        del task["max_token_id"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert _data(source="indexed", path=str(out)).max_token_id == max(read_back, memory.pad_id)


def _truncate(path, keep: int = 8):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - keep)


DAMAGE = {  # what happens to the folder -> the file the error must name
    "truncated tokens": (lambda out: _truncate(out / "code_completion.bin"), "code_completion.bin"),
    "truncated index": (lambda out: _truncate(out / "text_to_code.idx"), "text_to_code.idx"),
    "missing loss mask": (
        lambda out: (out / "code_to_docstring_loss_mask.bin").unlink(),
        "code_to_docstring_loss_mask.bin",
    ),
    "missing task ids": (
        lambda out: (out / "code_completion_task_id.idx").unlink(),
        "code_completion_task_id.idx",
    ),
    "files of another run": (
        lambda out: [
            (out / f"text_to_code.{e}").write_bytes((out / f"code_completion.{e}").read_bytes())
            for e in ("bin", "idx")
        ],
        "text_to_code.idx",
    ),
    "garbled manifest": (
        lambda out: (out / "manifest.json").write_text('{"format": "megamft-indexed/1", "tas'),
        "manifest.json",
    ),
    "no manifest": (lambda out: (out / "manifest.json").unlink(), "manifest.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_data_folder_is_named_before_training(tmp_path, damage):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = _preprocessed_corpus(tmp_path)
    if (
        damage == "truncated tokens"
    ):  # megatron's reader alone: a numpy error naming no file, at the first bad read
        _truncate(out / "code_completion.bin")
        dataset = IndexedDataset(str(out / "code_completion"))
        with pytest.raises(ValueError) as bare:
            dataset[len(dataset) - 1]
        assert "code_completion" not in str(bare.value)
    spoil, file = DAMAGE[damage]
    spoil(out)
    with pytest.raises(ValueError) as err:
        _data(source="indexed", path=str(out))
    message = str(err.value)
    assert str(out / file) in message.replace(
        f"data.path={out}: no manifest.json", f"{out / 'manifest.json'}"
    )
    assert f"megamft-preprocess --out {out}" in message
