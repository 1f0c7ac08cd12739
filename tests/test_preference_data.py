"""Preference records through megamft-preprocess: both formats, pairs as consecutive documents learned
on their last answer only, read back with megatron-core's IndexedDataset; bad pairs named or counted."""

import json

import numpy as np
import pytest
from data_fixtures import as_line, run_preprocess, write_raw
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from megamft.data.tokenizer import load_tokenizer

PROMPT = [
    ("system", "You write Python."),
    ("user", "Reverse a list."),
    ("assistant", "xs[::-1]"),
    ("user", "In place?"),
]


def _turns(turns, roles=None):
    roles = roles or {}
    return [{"role": roles.get(r, r), "content": c} for r, c in turns]


def _mftcoder_pair(chosen, rejected, prompt=PROMPT):
    names = {"user": "human", "assistant": "bot"}
    return json.dumps(
        {
            "chosen": _turns(prompt + [("assistant", chosen)], names),
            "rejected": _turns(prompt + [("assistant", rejected)], names),
        }
    )


def _prompt_pair(chosen, rejected, prompt=PROMPT):
    return json.dumps({"prompt": _turns(prompt), "chosen": chosen, "rejected": rejected})


def _documents(out, entry):
    tokens, masks = (
        IndexedDataset(str(out / entry["prefix"])),
        IndexedDataset(str(out / entry["loss_mask_prefix"])),
    )
    task_ids = IndexedDataset(str(out / entry["task_id_prefix"]))
    assert len(tokens) == len(masks) == len(task_ids) == entry["documents"]
    assert all(task_ids[d].tolist() == [entry["id"]] for d in range(len(tokens)))
    return [(tokens[d].copy(), masks[d].copy()) for d in range(len(tokens))]


@pytest.mark.parametrize("template", ["mftcoder", "chatml"])
def test_both_formats_write_pairs_learned_on_the_last_answer(tmp_path, template):
    answers = [("xs.reverse()", "xs = list(reversed(xs))"), ("list.reverse(xs)", "reversed(xs)")]
    plain = [as_line(PROMPT + [("assistant", "x")], "messages")]
    out, manifest = run_preprocess(
        tmp_path,
        {
            "sft": plain,
            "mft": [_mftcoder_pair(*a) for a in answers],
            "trl": [_prompt_pair(*a) for a in answers],
        },
        template=template,
    )
    tokenizer = load_tokenizer("byte")
    sft, mft, trl = manifest["tasks"]
    assert (sft["preference"], mft["preference"], trl["preference"]) == (False, True, True)
    mft_docs, trl_docs = _documents(out, mft), _documents(out, trl)
    assert len(mft_docs) == 4 and [d[0].tolist() for d in mft_docs] == [
        d[0].tolist() for d in trl_docs
    ]
    for index, (ids, mask) in enumerate(mft_docs):
        learned = tokenizer.decode(ids[mask == 1].tolist())
        assert (
            answers[index // 2][index % 2] in learned and "xs[::-1]" not in learned
        )  # not the earlier answer
        assert np.all(np.diff(np.flatnonzero(mask)) == 1)  # one learned run: the last answer
    for k in range(2):  # the halves of a pair share their prompt tokens exactly
        (c_ids, c_mask), (r_ids, r_mask) = mft_docs[2 * k], mft_docs[2 * k + 1]
        start_c, start_r = int(np.flatnonzero(c_mask)[0]), int(np.flatnonzero(r_mask)[0])
        assert start_c == start_r and c_ids[:start_c].tolist() == r_ids[:start_r].tolist()


BAD_PAIRS = {
    "different_prompts": (
        json.dumps(
            {
                "chosen": _turns([("user", "a"), ("assistant", "b")]),
                "rejected": _turns([("user", "A"), ("assistant", "c")]),
            }
        ),
        "differ before their last turn",
    ),
    "empty_answer": (_prompt_pair("", "x"), "empty 'chosen'"),
    "wrong_last_role": (
        json.dumps(
            {
                "chosen": _turns([("user", "a"), ("assistant", "b"), ("user", "c")]),
                "rejected": _turns([("user", "a"), ("assistant", "d")]),
            }
        ),
        "does not end with an answer",
    ),
    "prompt_ending_with_answer": (
        _prompt_pair("x", "y", [("user", "a"), ("assistant", "b")]),
        "role 'assistant' where 'user' must come",
    ),
    "missing_half": (json.dumps({"prompt": "q", "chosen": "a"}), "'rejected' is missing"),
    "identical_answers": (_prompt_pair("same", "same"), "the same answer"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PAIRS))
def test_a_bad_pair_stops_with_file_line_and_reason(tmp_path, kind):
    line, reason = BAD_PAIRS[kind]
    path = write_raw(tmp_path / "in.jsonl", [_prompt_pair("a", "b"), line])
    with pytest.raises(PreprocessError) as err:
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), progress=False
            )
        )
    assert f"{path}:2: " in str(err.value) and reason in str(err.value)


def test_skip_counts_bad_pairs_duplicates_and_overlong_pairs_once(tmp_path):
    good = [_prompt_pair(f"a{i}", f"b{i}") for i in range(3)]
    long = _prompt_pair("x" * 300, "short")
    lines = good + [line for line, _ in BAD_PAIRS.values()] + [good[0], long]
    path = write_raw(tmp_path / "in.jsonl", lines)
    manifest = preprocess(
        PreprocessOptions(
            tasks={"t": [str(path)]},
            out_dir=str(tmp_path / "out"),
            on_bad_line="skip",
            max_seq_length=200,
            overlong="drop",
            progress=False,
        )
    )
    task = manifest["tasks"][0]
    assert task["documents"] == 6 and task["preference"]
    assert task["dropped"]["duplicate"] == 1 and task["dropped"]["overlong"] == 1
    assert sum(task["dropped"].values()) == 2 + len(BAD_PAIRS)


def test_a_task_mixing_pairs_and_other_records_is_refused(tmp_path):
    path = write_raw(
        tmp_path / "in.jsonl",
        [_prompt_pair("a", "b"), as_line([("user", "q"), ("assistant", "a")], "messages")],
    )
    with pytest.raises(
        PreprocessError, match=f"{path}:2: a record that is not a preference pair in task t"
    ):
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), progress=False
            )
        )


def test_truncating_pairs_is_refused(tmp_path):
    path = write_raw(tmp_path / "in.jsonl", [_prompt_pair("x" * 300, "y")])
    with pytest.raises(
        PreprocessError, match="--overlong truncate would cut the answers of preference pairs"
    ):
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(path)]},
                out_dir=str(tmp_path / "out"),
                max_seq_length=100,
                overlong="truncate",
                progress=False,
            )
        )
