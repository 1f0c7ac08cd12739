"""What the sequences leave out of the data is counted and said (megamft.data.coverage): samples cut to
data.seq_length, against what the collated batches really hold; tasks a data epoch or a run never samples,
against the real epoch's order; task weights checked against the data's task names."""

import numpy as np
import pytest
from data_fixtures import as_line, run_preprocess

from megamft.config import ConfigError, load_config, validate
from megamft.data.dataset import load_data
from megamft.testing.forked_command import run_module

SEQ = 48
MODES = ("pad", "dynamic", "pack", "concat")


def _sample(prompt_words: int, answer_words: int, i: int) -> str:
    return as_line(
        [
            ("user", " ".join(f"q{i}w{k}" for k in range(prompt_words))),
            ("assistant", " ".join(f"a{i}w{k}" for k in range(answer_words))),
        ],
        "messages",
    )


@pytest.fixture(scope="module")
def long_samples(tmp_path_factory):
    """Two tasks (byte tokenizer), short samples, samples longer than SEQ + 1 tokens, and samples whose
    prompt alone exceeds the sequence (their answer lies past any cut)."""
    tmp = tmp_path_factory.mktemp("coverage")
    tasks = {
        "short": [_sample(2, 3, i) for i in range(20)],
        "mixed": [_sample(2 + (i % 5) * 4, 2 + (i % 3) * 6, i) for i in range(24)]
        + [_sample(30, 2, 100 + i) for i in range(4)],
    }
    out, manifest = run_preprocess(tmp, tasks, dedup=False)
    return out, manifest


def _data(folder, *overrides):
    cfg = load_config(
        None,
        [
            "data.source=indexed",
            f"data.path={folder}",
            f"data.seq_length={SEQ}",
            "data.valid_samples_per_task=2",
            *overrides,
        ],
    )
    validate(cfg, 1)
    return load_data(cfg.data)


def _held_in_batches(data):
    """Per (task, doc): positions and learned positions one data epoch's collated batches hold."""
    held = {}
    rows = [data.train.row(p) for p in range(data.train.sequences_per_epoch())]
    for start in range(0, len(rows), 4):
        chunk = rows[start : start + 4]
        batch = data.batches(chunk, 4)[0]
        for r, (tasks, docs) in enumerate(chunk):
            for k, key in enumerate(zip(tasks.tolist(), docs.tolist())):
                mine = (batch["sample_ids"][r] == k) & ~batch["padding"][r]
                assert key not in held  # one data epoch takes every training sample once
                held[key] = (int(mine.sum()), int(batch["loss_mask"][r][mine].sum()))
    return held


@pytest.mark.parametrize("mode", MODES)
def test_cut_samples_are_counted_as_the_batches_hold_them(long_samples, mode):
    folder, _ = long_samples
    data = _data(folder, f"data.mode={mode}")
    held = _held_in_batches(data)
    overlong = cut = learned_cut = emptied = samples = 0
    for (task, doc), (positions, learned) in held.items():
        ids, mask = data.stores[task].get(doc)
        samples += 1
        overlong += positions < len(ids) - 1
        cut += len(ids) - 1 - positions
        learned_cut += int(mask[1:].sum()) - learned
        emptied += learned == 0 and mask[1:].any()
    counted = data.coverage.train
    assert overlong > 0 and emptied > 0  # the fixture has both kinds
    assert (
        counted.samples,
        counted.overlong,
        counted.cut_tokens,
        counted.cut_learned,
        counted.nothing_learned,
    ) == (samples, overlong, cut, learned_cut, emptied)
    line = data.coverage.lines()[0]
    assert (
        line.startswith(f"{overlong} of {samples} training samples ({overlong / samples:.1%}; ")
        and f"exceed data.seq_length={SEQ}" in line
        and f"{cut:,} tokens cut" in line
    ), line
    assert f"{emptied:,} keep no learned token" in line


def test_samples_cut_at_preprocessing_are_said(tmp_path):
    lines = (
        [_sample(2, 2, i) for i in range(6)]
        + [_sample(1, 20, 10 + i) for i in range(3)]
        + [_sample(20, 1, 20 + i) for i in range(2)]
    )  # the answer lies past the cut: dropped
    folder, manifest = run_preprocess(
        tmp_path, {"t": lines}, max_seq_length=40, overlong="truncate"
    )
    data = _data(folder, "data.valid_samples_per_task=2")
    truncated, dropped = manifest["tasks"][0]["truncated"], manifest["tasks"][0]["dropped"]
    assert (truncated, dropped) == (3, {"no_answer_left_after_truncation": 2})
    assert (data.coverage.preprocess_cut, data.coverage.preprocess_dropped) == ({"t": 3}, {"t": 2})
    assert any(
        line.startswith(
            "megamft-preprocess already cut 3 and dropped 2 sample(s) longer than "
            "--max-seq-length 40 tokens"
        )
        for line in data.coverage.lines()
    )


def test_a_task_no_epoch_samples_is_named_with_the_key_to_change(long_samples):
    folder, _ = long_samples
    data = _data(
        folder,
        "data.task_sampling=weights",
        "data.task_sampling_weights={short: 1, mixed: 0.01}",
        "data.epoch_samples=20",
    )
    sampled = {int(t) for epoch in range(3) for t in data.train.mixture.epoch(epoch)[0]}
    names = [name for task, name in enumerate(data.task_names) if task not in sampled]
    assert names == ["mixed"] and list(data.coverage.unsampled_tasks) == names
    assert any(
        line.startswith("task mixed gets no training sample in any data epoch")
        and "data.task_sampling_weights" in line
        for line in data.coverage.lines()
    )
    assert not _data(folder).coverage.unsampled_tasks


def test_a_task_the_run_never_reaches_is_named(tmp_path):
    from megamft.training.data_report import tasks_absent_from_run

    folder, _ = run_preprocess(
        tmp_path,
        {
            "big": [_sample(1, 1, i) for i in range(300)],
            "tiny": [_sample(1, 1, 1000 + i) for i in range(3)],
        },
        dedup=False,
    )
    overrides = [
        "data.mode=pad",
        "data.valid_samples_per_task=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.train_steps=3",
        "train.lr_warmup_steps=0",
    ]
    cfg = load_config(None, ["data.source=indexed", f"data.path={folder}", *overrides])
    data = load_data(cfg.data)
    trained = {
        int(t)
        for step in range(3)
        for tasks, _ in data.train_rows(4 * step, 4, 0, 1)
        for t in tasks
    }
    assert trained == {0}  # the run's 12 sequences hold no sample of 'tiny' (2 of 301 per epoch)
    absent = tasks_absent_from_run(cfg, data)
    assert list(absent) == ["tiny"] and "train.train_steps" in absent["tiny"]
    longer = load_config(
        None, ["data.source=indexed", f"data.path={folder}", *overrides, "train.train_steps=200"]
    )
    assert tasks_absent_from_run(longer, data) == {}


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["loss.task_weights={other: 1}"],
            "loss.task_weights names unknown task(s) ['other']; the data's tasks are",
        ),
        (["loss.task_weights={short: 0, mixed: 0}"], "loss.task_weights gives every task weight 0"),
        (
            ["data.task_sampling=weights", "data.task_sampling_weights={other: 1}"],
            "data.task_sampling_weights names unknown task(s) ['other']",
        ),
        (
            [
                "data.task_sampling=weights",
                "data.task_sampling_weights={short: 1}",
                "loss.task_weights={short: 0}",
            ],
            "loss.task_weights gives every sampled task (['short']) weight 0",
        ),
    ],
)
def test_task_weights_are_checked_against_the_manifest_before_anything_starts(
    long_samples, overrides, fragment
):
    folder, _ = long_samples
    cfg = load_config(None, ["data.source=indexed", f"data.path={folder}", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert any(fragment in p for p in err.value.problems), err.value.problems


def test_embedded_corpus_task_weights_are_checked_when_the_data_is_read():
    from megamft.training.loop import static_task_weights

    cfg = load_config(
        None,
        ["data.task_sampling=weights", "data.task_sampling_weights={code_completion: 1, nope: 1}"],
    )
    validate(cfg, 1)  # the embedded corpus's tasks are known once it is built
    with pytest.raises(
        ConfigError, match=r"data.task_sampling_weights names unknown task\(s\) \['nope'\]"
    ):
        load_data(cfg.data)
    cfg = load_config(
        None, ["loss.task_weights={code_completion: 0, text_to_code: 0, code_to_docstring: 0}"]
    )
    validate(cfg, 1)
    names = load_data(cfg.data).task_names
    with pytest.raises(ConfigError, match="loss.task_weights gives every task weight 0"):
        static_task_weights(cfg, names)
    assert static_task_weights(
        load_config(None, ["loss.task_weights={code_completion: 0}"]), names
    ).tolist() == [0.0, 1.0, 1.0]


def test_samples_the_embedded_corpus_leaves_out_are_counted():
    from megamft.data.stdlib_corpus import build_corpus

    cfg = load_config(None, [])
    data = load_data(cfg.data)
    per_task = (cfg.data.max_samples_per_task or 10**9) + cfg.data.valid_samples_per_task
    corpus = build_corpus(cfg.data.seq_length - 8, per_task, cfg.data.seed)
    for name, store in zip(data.task_names, data.stores):
        assert store.lengths.max() <= cfg.data.seq_length + 1
        assert data.coverage.left_out_by_source[name] == len(corpus[name]) - len(store.lengths)
    left = sum(data.coverage.left_out_by_source.values())
    assert left > 0 and any(
        line.startswith(f"the embedded corpus left out {left:,} sample(s)")
        for line in data.coverage.lines()
    )


@pytest.mark.slow
def test_a_training_run_says_what_is_cut_and_records_it(tmp_path):
    """`megamft train` (one process) on data with samples longer than the sequence: one line at start-up
    and the run's manifest, counted against megatron-core's own reader of the data."""
    import json
    import os
    from pathlib import Path

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lines = [
        as_line([("user", "x " * (1 + i % 40)), ("assistant", "y " * (1 + i % 30))], "messages")
        for i in range(40)
    ]
    folder, manifest = run_preprocess(tmp_path, {"a": lines, "b": lines[::-1]}, dedup=False)
    readers = [
        IndexedDataset(str(folder / t["prefix"])) for t in manifest["tasks"]
    ]  # alive while arrays are read
    lengths = np.concatenate([reader.sequence_lengths for reader in readers]).astype(np.int64)
    over = lengths[lengths > SEQ + 1]
    settings = [
        "data.source=indexed",
        f"data.path={folder}",
        f"data.seq_length={SEQ}",
        "data.valid_samples_per_task=0",
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "train.train_steps=1",
        "train.lr_warmup_steps=0",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        f"checkpoint.save_dir={tmp_path / 'run'}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = run_module(
        "megamft", ["train", *settings], env, Path(__file__).resolve().parents[1], timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = f"{len(over)} of {len(lengths)} training samples ({len(over) / len(lengths):.1%}; "
    assert sum(said in line for line in done.stderr.splitlines()) == 1, done.stderr[-3000:]
    assert f"{int((over - SEQ - 1).sum()):,} tokens cut" in done.stderr
    recorded = json.loads((tmp_path / "run" / "run_manifest.json").read_text())["data"]["train"]
    assert (
        recorded["samples"],
        recorded["overlong"],
        recorded["cut_tokens"],
        recorded["longest"],
    ) == (len(lengths), len(over), int((over - SEQ - 1).sum()), int(lengths.max()))


def test_learned_tokens_of_many_cut_samples_are_estimated_from_a_sample_of_them():
    from megamft.data.coverage import count_cuts
    from megamft.data.dataset import InMemoryDocuments

    rng = np.random.default_rng(3)
    lengths = rng.integers(10, 200, 4000)
    masks = [(rng.random(n) < rng.random()).astype(np.uint8) for n in lengths]
    store = InMemoryDocuments([np.zeros(n, np.int64) for n in lengths], masks)
    docs = np.arange(len(lengths))
    exact = count_cuts(store, docs, 64, exact_limit=len(docs))
    estimate = count_cuts(store, docs, 64, exact_limit=500)
    assert not exact.estimated and estimate.estimated
    assert (estimate.overlong, estimate.cut_tokens) == (
        exact.overlong,
        exact.cut_tokens,
    )  # always exact
    assert abs(estimate.cut_learned - exact.cut_learned) < 0.1 * exact.cut_learned
    assert "about " in _line_of(estimate) and "about " not in _line_of(exact)


def _line_of(count):
    from megamft.data.coverage import DataCoverage

    return DataCoverage(64, train=count, train_per_task={"t": count}).lines()[0]
