"""megamft-preprocess's other inputs: .jsonl.zst, Parquet with a column mapping, and folders of source files.

The reference is the plain .jsonl path (tests/test_preprocess.py checks it against the templates): the
same records in any format give the same bytes, read back with megatron-core's IndexedDataset."""

import hashlib
import json
import re
import sys

import pytest
from data_fixtures import CONVERSATIONS, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from megamft.data.tokenizer import load_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

OUTPUTS = ("t.bin", "t.idx", "t_loss_mask.bin", "t_loss_mask.idx", "t_task_id.bin", "t_task_id.idx")


def _records(count: int) -> list[dict]:
    """Records of every form: conversations, two-field pairs (some with a system), documents."""
    records = []
    for i in range(count):
        if i % 3 == 0:
            turns = CONVERSATIONS[i % len(CONVERSATIONS)] + [
                ("user", f"again {i}?"),
                ("assistant", f"yes {i}"),
            ]
            if turns[0][0] == "system":
                turns = turns[1:]
            records.append({"messages": [{"role": r, "content": c} for r, c in turns]})
        elif i % 3 == 1:
            records.append(
                {"prompt": f"question {i}", "answer": f"answer {i} " * (i % 5 + 1)}
                | ({"system": "be brief"} if i % 2 else {})
            )
        else:
            records.append({"text": f"def f{i}(x):\n    return x * {i}\n"})
    return records


def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _zstd(data: bytes, frames: int = 1) -> bytes:
    """`data` as `frames` concatenated zstd frames (as pzstd and split-then-cat write), with checksums."""
    cut = [len(data) * k // frames for k in range(frames + 1)]
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(compressor.compress(data[a:b]) for a, b in zip(cut, cut[1:]))


def _parquet(
    path, records: list[dict], renamed: dict[str, str], row_group_size: int, compression="snappy"
) -> None:
    """The records as one table, every field a column (null where a record lacks it), some renamed."""
    names = list(dict.fromkeys(k for r in records for k in r))
    table = pa.table(
        {renamed.get(n, n): [r.get(n) for r in records] for n in names}
        | {"id": list(range(len(records)))}
    )
    pq.write_table(
        table,
        path,
        row_group_size=row_group_size,
        write_page_checksum=True,
        use_dictionary=False,
        compression=compression,
    )


def _run(tmp_path, name: str, paths: list, **options) -> dict:
    out = tmp_path / name
    options = {"progress": False, "chunk_lines": 16, "dedup": False} | options
    preprocess(PreprocessOptions(tasks={"t": [str(p) for p in paths]}, out_dir=str(out), **options))
    return {n: (out / n).read_bytes() for n in OUTPUTS}


def _documents(folder, prefix: str = "t") -> list[list[int]]:
    dataset = IndexedDataset(str(folder / prefix))  # megatron-core's own reader
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_the_same_records_in_zst_and_parquet_give_the_jsonl_bytes(tmp_path, tokenizers):
    records = _records(150)
    data = _jsonl_bytes(records)
    (tmp_path / "r.jsonl").write_bytes(data)
    (tmp_path / "r.jsonl.zst").write_bytes(_zstd(data, frames=3))
    _parquet(
        tmp_path / "r.parquet",
        records,
        {"text": "content", "prompt": "question"},
        row_group_size=40,
    )
    columns = {
        "text": "content",
        "prompt": "question",
    }  # `question` is also a field: read as `prompt` only
    mapped = [{columns.get(k, k): v for k, v in r.items()} for r in records]
    (tmp_path / "mapped.jsonl").write_bytes(_jsonl_bytes(mapped))
    sp = tokenizers["sentencepiece"]
    reference = _run(tmp_path, "jsonl", [tmp_path / "r.jsonl"], tokenizer=sp)
    assert _run(tmp_path, "zst", [tmp_path / "r.jsonl.zst"], tokenizer=sp) == reference
    assert (
        _run(tmp_path, "parquet", [tmp_path / "r.parquet"], tokenizer=sp, columns=columns)
        == reference
    )
    assert (
        _run(tmp_path, "mapped", [tmp_path / "mapped.jsonl"], tokenizer=sp, columns=columns)
        == reference
    )
    documents = _documents(tmp_path / "parquet")
    assert len(documents) == 150 and documents == _documents(tmp_path / "jsonl")
    text = load_tokenizer(sp).decode(documents[2])
    assert "def f2(x):" in text and "return x * 2" in text


def _source_folder(tmp_path):
    """Two source files to read, and one of each kind not to read."""
    folder = tmp_path / "repo"
    (folder / "pkg").mkdir(parents=True)
    (folder / ".git").mkdir()
    files = {
        "pkg/util.py": "def add(a, b):\n    return a + b\n",
        "main.c": '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n',
        "pkg/model_pb2.py": "# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  DO NOT EDIT!\nx = 1\n",
        "vendor.min.js": "var a=1;" * 150 + "\n",
        "big.py": "x = 1\n" * 400,
        "notes.csv": "a,b\n1,2\n",
        "empty.py": "\n\n",
        ".git/config": "[core]\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "logo.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return folder, files


def test_a_source_folder_gives_one_document_per_source_file_and_records_paths(tmp_path, capsys):
    from megamft.data.preprocess_cli import main

    folder, files = _source_folder(tmp_path)
    (folder / "pkg" / "copy.py").write_text(
        files["pkg/util.py"]
    )  # read, but a duplicate: no document
    assert (
        main(
            [
                "--task",
                f"t=sources:{folder}",
                "--out",
                str(tmp_path / "out"),
                "--source-max-bytes",
                "2000",
                "--source-extensions",
                ".py,.c,.js",
                "--quiet",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    task = manifest["tasks"][0]
    assert [(i["path"], i["documents"]) for i in task["inputs"]] == [
        (str(folder / "main.c"), 1),
        (str(folder / "pkg" / "copy.py"), 1),
        (str(folder / "pkg" / "util.py"), 0),
    ]
    assert task["dropped"] == {"duplicate": 1}
    skipped = {
        entry["path"][len(str(folder)) + 1 :]: entry["reason"] for entry in task["skipped_inputs"]
    }
    assert skipped == {
        ".git": "hidden",
        "big.py": "larger than --source-max-bytes",
        "empty.py": "empty",
        "latin1.py": "not UTF-8 text",
        "logo.py": "binary",
        "notes.csv": "extension not in --source-extensions",
        "pkg/model_pb2.py": "generated",
        "vendor.min.js": "minified or data (a line over --source-max-line-length)",
    }
    assert "8 entries not read" in capsys.readouterr().out
    # The reference: the same two files as `text` records of a .jsonl.
    reference = tmp_path / "reference.jsonl"
    reference.write_bytes(_jsonl_bytes([{"text": files["main.c"]}, {"text": files["pkg/util.py"]}]))
    expected = _run(tmp_path, "reference", [reference])
    assert {n: (tmp_path / "out" / n).read_bytes() for n in OUTPUTS} == expected
    documents = _documents(tmp_path / "out")
    assert len(documents) == 2 and files["pkg/util.py"] in load_tokenizer("byte").decode(
        documents[1]
    )


def test_every_format_is_byte_identical_at_any_worker_count(tmp_path, tokenizers):
    records = _records(120)
    mapped = [{("content" if k == "text" else k): v for k, v in r.items()} for r in records]
    (tmp_path / "r.jsonl.zst").write_bytes(_zstd(_jsonl_bytes(mapped), frames=2))
    _parquet(tmp_path / "r.parquet", records, {"text": "content"}, row_group_size=25)
    folder, _ = _source_folder(tmp_path)
    paths = [tmp_path / "r.jsonl.zst", tmp_path / "r.parquet", f"sources:{folder}"]
    hf = tokenizers["huggingface"]
    one = _run(tmp_path, "w1", paths, tokenizer=hf, columns={"text": "content"}, template="chatml")
    two = _run(
        tmp_path,
        "w2",
        paths,
        tokenizer=hf,
        columns={"text": "content"},
        template="chatml",
        workers=2,
    )
    assert one == two and len(_documents(tmp_path / "w2")) == 2 * 120 + 3  # main.c, util.py, big.py


def _lines_decoded(data: bytes) -> int:
    """Whole lines of a damaged zstd stream, decoded by zstandard's streaming reader (which stops quietly)."""
    reader = zstandard.ZstdDecompressor().stream_reader(data)
    out = b""
    try:
        while chunk := reader.read(1 << 16):
            out += chunk
    except zstandard.ZstdError:
        pass
    return out.count(b"\n")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_zst_names_file_and_line_or_is_counted_under_skip(tmp_path, damage):
    # Text that compresses little, so that the file spans many reads and the damage comes late.
    lines = [
        json.dumps({"prompt": f"q{i}", "answer": hashlib.sha256(str(i).encode()).hexdigest()})
        for i in range(6000)
    ]
    data = _zstd(("\n".join(lines) + "\n").encode())
    data = (
        data[: len(data) // 2]
        if damage == "truncated"
        else data[:-2] + bytes([data[-2] ^ 0xFF]) + data[-1:]
    )
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(data)
    options = PreprocessOptions(
        tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), progress=False
    )
    found = "the zstd file is truncated" if damage == "truncated" else "the zstd data is corrupt"
    with pytest.raises(PreprocessError, match=f"{path}:(\\d+): {found}") as error:
        preprocess(options)
    line = int(re.search(f"{path}:(\\d+):", str(error.value)).group(1))
    if damage == "truncated":
        assert line == _lines_decoded(data) + 1
    assert 1 < line <= 6000
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {"corrupt_zstd": 1} and task["documents"] == line - 1
    assert task["inputs"][0]["unread_from_line"] == line


def test_a_bad_parquet_row_and_a_damaged_row_group_are_named_by_file_and_row(tmp_path):
    records = [{"text": f"doc {i}"} for i in range(300)]
    records[136] = {"text": None}
    path = tmp_path / "t.parquet"
    _parquet(path, records, {"text": "content"}, row_group_size=100)
    options = PreprocessOptions(
        tasks={"t": [str(path)]},
        out_dir=str(tmp_path / "out"),
        progress=False,
        columns={"text": "content"},
    )
    with pytest.raises(
        PreprocessError, match=f"{path}:137: no 'chat_rounds', 'messages' or 'text' field"
    ):
        preprocess(options)
    records[136] = {"text": "doc 136"}
    # Uncompressed: a changed digit still decodes, to other text ("doc 140"); only the page checksum tells.
    _parquet(path, records, {"text": "content"}, row_group_size=100, compression="none")
    damaged = bytearray(path.read_bytes())
    damaged[damaged.index(b"doc 150") + 5] ^= 0x01  # in row group 2, rows 101-200
    path.write_bytes(damaged)
    with pytest.raises(PreprocessError, match=f"{path}:101: the Parquet data cannot be read"):
        preprocess(options)
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {"corrupt_parquet": 1} and task["documents"] == 100


@pytest.mark.parametrize(
    "case", ["column missing", "not parquet", "unknown field", "zst named .jsonl"]
)
def test_parquet_columns_and_names_are_checked_before_any_work(tmp_path, case):
    path = tmp_path / "t.parquet"
    _parquet(path, [{"text": "a"}], {"text": "content"}, row_group_size=10)
    if case == "not parquet":
        path.write_bytes(b"PAR1 but not really")
    if case == "zst named .jsonl":
        path = tmp_path / "t.jsonl"
        path.write_bytes(_zstd(b'{"text": "a"}\n'))
    columns = {"unknown field": {"body": "content"}}.get(
        case, {"text": "body" if case == "column missing" else "content"}
    )
    expected = {
        "column missing": r"has no column for --columns text=body; its columns: content, id",
        "not parquet": "is not a readable Parquet file",
        "unknown field": "body is not a record field",
        "zst named .jsonl": "is zstd-compressed but named .jsonl; rename it to .jsonl.zst",
    }[case]
    with pytest.raises(PreprocessError, match=expected):
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(path)]},
                out_dir=str(tmp_path / "out"),
                progress=False,
                columns=columns,
            )
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("package, suffix", [("zstandard", ".jsonl.zst"), ("pyarrow", ".parquet")])
def test_a_missing_optional_package_is_named_with_its_extra(
    tmp_path, capsys, monkeypatch, package, suffix
):
    from megamft.data.preprocess_cli import main

    path = tmp_path / f"t{suffix}"
    if suffix == ".parquet":
        _parquet(path, [{"text": "a"}], {}, row_group_size=10)
    else:
        path.write_bytes(_zstd(b'{"text": "a"}\n'))
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    monkeypatch.setitem(sys.modules, f"{package}.parquet", None)
    assert main(["--task", f"t={path}", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'megamft[data]'" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_the_column_mapping_reaches_the_workers_from_the_cli(tmp_path, capsys):
    from megamft.data.preprocess_cli import main

    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"content": "x = 1", "id": 3})])
    assert (
        main(
            [
                "--task",
                f"t={path}",
                "--out",
                str(tmp_path / "out"),
                "--columns",
                "text=content",
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert load_tokenizer("byte").decode(_documents(tmp_path / "out")[0]).strip().endswith("x = 1")
    assert (
        main(
            ["--task", f"t={path}", "--out", str(tmp_path / "out2"), "--columns", "text", "--quiet"]
        )
        == 2
    )
    assert "expected FIELD=COLUMN" in capsys.readouterr().err


def test_the_column_mapping_and_source_rules_are_yaml_keys(tmp_path):
    from megamft.data.preprocess_cli import main

    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"content": "x = 1"})])
    folder, files = _source_folder(tmp_path)
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"tasks:\n  t: {path}\n  s: sources:{folder}\ncolumns: {{text: content}}\n"
        f"source_extensions: [.c]\nout: {tmp_path / 'out'}\n"
    )
    assert main(["--config", str(config), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [t["documents"] for t in manifest["tasks"]] == [1, 1]
    assert [i["path"] for i in manifest["tasks"][1]["inputs"]] == [str(folder / "main.c")]


def test_out_inside_a_source_folder_is_refused(tmp_path):
    folder, _ = _source_folder(tmp_path)
    with pytest.raises(PreprocessError, match="lies inside the input"):
        preprocess(
            PreprocessOptions(
                tasks={"t": [f"sources:{folder}"]}, out_dir=str(folder / "out"), progress=False
            )
        )
    assert not (folder / "out").exists()
