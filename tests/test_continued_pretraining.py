"""Continued pretraining on raw code: `--overlong split` cuts long records into pieces that learn every label
exactly once, and concat sequences over them train on every learned token with each record's end-of-document
token. The reference is always the same records preprocessed whole (no --max-seq-length), read back with
megatron-core's IndexedDataset, cut by the documented rule: piece k holds tokens k(L-1) .. k(L-1) + L."""

import json

import numpy as np
import pytest
from data_fixtures import as_line, run_preprocess
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megamft.config import load_config
from megamft.data.dataset import load_data

LIMIT = 48  # --max-seq-length: data.seq_length 47 + 1


def _code(i: int, lines: int) -> str:
    return json.dumps(
        {"text": "\n".join(f"def f{i}_{k}(x):\n    return x * {k} + {i}" for k in range(lines))}
    )


def _read(folder, name):
    """Every document's ids and mask, copied out of the maps (they close with their IndexedDataset)."""
    tokens, masks = (
        IndexedDataset(str(folder / name)),
        IndexedDataset(str(folder / f"{name}_loss_mask")),
    )
    return [(np.array(tokens[d]), np.array(masks[d])) for d in range(len(tokens))]


def _cut(ids: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pieces of one whole record, by the rule --overlong split documents, written out as a loop."""
    if len(ids) <= LIMIT:
        return [(ids, mask)]
    pieces, start = [], 0
    while start + 1 < len(ids):
        pieces.append((ids[start : start + LIMIT], mask[start : start + LIMIT]))
        start += LIMIT - 1
    return pieces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Raw code records, most longer than LIMIT tokens (byte tokenizer), preprocessed whole and split."""
    tmp = tmp_path_factory.mktemp("cpt")
    lines = [_code(i, 1 + (i * 7) % 9) for i in range(30)]
    whole, _ = run_preprocess(tmp / "whole", {"code": lines}, dedup=False)
    split, manifest = run_preprocess(
        tmp / "split", {"code": lines}, dedup=False, max_seq_length=LIMIT, overlong="split"
    )
    return _read(whole, "code"), _read(split, "code"), manifest, split


def test_split_pieces_rebuild_each_record_and_learn_every_label_once(corpus):
    whole, pieces, manifest, _ = corpus
    task = manifest["tasks"][0]
    expected = [_cut(ids, mask) for ids, mask in whole]
    cut = [p for p in expected if len(p) > 1]
    assert len(cut) > 10  # most records are cut
    assert (task["split"], task["pieces"], task["documents"]) == (
        len(cut),
        sum(map(len, cut)),
        sum(map(len, expected)),
    )
    assert not task["dropped"] and task["truncated"] == 0
    flat = [piece for record in expected for piece in record]
    assert [(i.tolist(), m.tolist()) for i, m in pieces] == [
        (i.tolist(), m.tolist()) for i, m in flat
    ]
    for (ids, mask), record in zip(whole, expected):  # every label in exactly one piece
        assert np.concatenate([m[1:] for _, m in record]).tolist() == mask[1:].tolist()
        assert (
            np.concatenate([record[0][0][:1]] + [i[1:] for i, _ in record]).tolist() == ids.tolist()
        )


def test_pieces_holding_only_a_prompt_are_dropped_and_counted(tmp_path):
    lines = [
        as_line(
            [("user", " ".join(f"word{k}" for k in range(n))), ("assistant", f"ok {n}")], "messages"
        )
        for n in (3, 25, 40)
    ]
    whole, _ = run_preprocess(tmp_path / "whole", {"chat": lines})
    folder, manifest = run_preprocess(
        tmp_path / "split", {"chat": lines}, max_seq_length=LIMIT, overlong="split"
    )
    expected = [_cut(ids, mask) for ids, mask in _read(whole, "chat")]
    kept = [p for record in expected for p in record if len(record) == 1 or p[1][1:].any()]
    task = manifest["tasks"][0]
    assert task["dropped"]["piece_without_answer"] == sum(map(len, expected)) - len(kept) >= 3
    assert task["documents"] == len(kept)
    assert task["split"] == sum(len(r) > 1 for r in expected) == 2
    assert [i.tolist() for i, _ in _read(folder, "chat")] == [i.tolist() for i, _ in kept]


def test_dedup_compares_whole_records_not_pieces(tmp_path):
    """Two files with the same first LIMIT tokens keep all their pieces; a repeated file is dropped whole."""
    header = "# Copyright the authors. Licensed under the Apache License 2.0.\n"
    texts = [header + "def a():\n    return 1\n" * 3, header + "def b():\n    return 2\n" * 3]
    lines = [json.dumps({"text": t}) for t in texts + texts[:1]]
    whole, _ = run_preprocess(tmp_path / "whole", {"code": lines[:2]})
    folder, manifest = run_preprocess(
        tmp_path / "split", {"code": lines}, max_seq_length=LIMIT, overlong="split"
    )
    expected = [p for ids, mask in _read(whole, "code") for p in _cut(ids, mask)]
    assert (
        expected[0][0].tolist() == expected[len(_cut(*_read(whole, "code")[0]))][0].tolist()
    )  # shared start
    task = manifest["tasks"][0]
    assert [i.tolist() for i, _ in _read(folder, "code")] == [i.tolist() for i, _ in expected]
    assert (task["split"], task["pieces"]) == (2, len(expected))
    assert task["dropped"] == {"duplicate": len(_cut(*_read(whole, "code")[0]))}


@pytest.mark.parametrize("mode", ["concat", "pack"])
def test_every_learned_token_of_the_split_records_is_trained_on(corpus, mode):
    whole, _, _, folder = corpus
    cfg = load_config(
        None,
        [
            "data.source=indexed",
            f"data.path={folder}",
            f"data.seq_length={LIMIT - 1}",
            f"data.mode={mode}",
            "data.valid_samples_per_task=0",
        ],
    ).data
    data = load_data(cfg)
    rows = [data.train.row(p) for p in range(data.train.sequences_per_epoch())]
    batches = data.batches(rows, 4)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(
        int(mask[1:].sum()) for _, mask in whole
    )
    assert data.coverage.train.overlong == 0
    assert any(line.startswith("megamft-preprocess split ") for line in data.coverage.lines())
    eos = whole[0][0][-1]  # every text record ends with the end-of-document token, learned
    assert all(ids[-1] == eos and mask[-1] and (ids[:-1] != eos).all() for ids, mask in whole)
    ends = sum(int(((b["labels"] == eos) & (b["loss_mask"] > 0)).sum()) for b in batches)
    assert ends == len(whole)
    if mode == "concat":  # documents run on across a row: some rows hold the end of one and more
        assert any(len(docs) > 1 for _, docs in rows)


def test_a_task_learned_throughout_is_counted_without_reading_its_masks(tmp_path):
    """The start-up count of cut samples skips the loss masks of a task whose manifest counts every token
    learned (raw code: the mask reads are the slow part at 10^8 documents), and it counts what reading them
    counts; a task with prompts still reads them."""
    from megamft.data.coverage import count_cuts
    from megamft.data.dataset import IndexedDocuments

    code = [_code(i, 1 + (i * 7) % 9) for i in range(30)]
    chat = [
        as_line(
            [("user", f"question {i} " * (i % 7 + 1)), ("assistant", "answer " * (i + 1))],
            "messages",
        )
        for i in range(30)
    ]
    folder, manifest = run_preprocess(tmp_path, {"code": code, "chat": chat}, dedup=False)
    code_entry, chat_entry = manifest["tasks"]
    raw = IndexedDocuments(folder, code_entry, manifest["token_dtype"])
    prompted = IndexedDocuments(folder, chat_entry, manifest["token_dtype"])
    assert raw.all_learned and not prompted.all_learned
    docs = np.arange(len(raw.lengths))
    read = IndexedDocuments(folder, code_entry, manifest["token_dtype"])
    read.all_learned = False  # the reference: every overlong sample's mask read from the .bin
    expected = count_cuts(read, docs, 24)
    assert expected.overlong > 10 and expected.cut_learned > 0

    def no_reads(doc):
        raise AssertionError(f"read the loss mask of document {doc}")

    raw.loss_mask = no_reads
    assert count_cuts(raw, docs, 24) == expected
