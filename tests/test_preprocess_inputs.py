"""megamft-preprocess's inputs and command line: every input checked before any work, task names,
damaged files named by file and line, the CLI's exit status and messages."""

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from data_fixtures import CONVERSATIONS, as_line, write_jsonl, write_raw

from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess


def test_cli_reports_bad_line_and_exits_2(tmp_path):
    path = write_raw(
        tmp_path / "in.jsonl", [as_line(CONVERSATIONS[2], "messages"), '{"messages": 3}']
    )
    result = subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--task",
            f"t={path}",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert f"{path}:2: '" in result.stderr and "non-empty list" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_reads_tasks_from_yaml(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [as_line(c, "chat_rounds") for c in CONVERSATIONS])
    config = tmp_path / "prep.yaml"
    config.write_text(f"tasks:\n  code: {path}\nout: {tmp_path / 'out'}\ntemplate: chatml\n")
    result = subprocess.run(
        [sys.executable, "-m", "megamft.data.preprocess_cli", "--config", str(config), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["template"]["name"] == "chatml" and manifest["tasks"][0]["documents"] == 3


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from megamft.data.preprocess_cli import main

    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def test_a_task_given_twice_is_refused_not_silently_replaced(tmp_path, capsys):
    x = write_jsonl(tmp_path / "x.jsonl", [as_line(CONVERSATIONS[0], "messages")])
    y = write_jsonl(tmp_path / "y.jsonl", [as_line(CONVERSATIONS[1], "messages")])
    code, err = _cli(
        ["--task", f"a={x}", "--task", f"a={y}", "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "task 'a' is given twice" in err and not (tmp_path / "out").exists()
    config = tmp_path / "prep.yaml"
    config.write_text(f"tasks:\n  a: {x}\n  a: {y}\nout: {tmp_path / 'out'}\n")
    code, err = _cli(["--config", str(config)], capsys)
    assert code == 2 and "'a' is given twice" in err
    config.write_text(f"tasks:\n  a: {x}\nout: {tmp_path / 'out'}\n")
    code, err = _cli(["--config", str(config), "--task", f"a={y}"], capsys)
    assert code == 2 and f"task 'a' is given twice (--task a={y} and in {config})" in err


@pytest.mark.parametrize(
    "names",
    [("Code", "code"), ("a", "a_loss_mask"), ("a", "A_task_id"), ("a/b",), ("..",), ("a.",)],
    ids="+".join,
)
def test_task_names_that_would_share_or_escape_files_are_refused(tmp_path, names):
    path = write_jsonl(tmp_path / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    with pytest.raises(
        PreprocessError, match="rename one of them" if len(names) == 2 else "task name"
    ):
        preprocess(
            PreprocessOptions(
                tasks={n: [str(path)] for n in names}, out_dir=str(tmp_path / "out"), progress=False
            )
        )
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
    write_jsonl(
        folder / ".ipynb_checkpoints" / "t-checkpoint.jsonl",
        [as_line(CONVERSATIONS[0], "chat_rounds")],
    )
    (folder / "._t.jsonl").write_bytes(
        b"\x00\x05\x16\x07Mac OS X        \x00\x02"
    )  # a macOS AppleDouble copy
    manifest = preprocess(
        PreprocessOptions(
            tasks={"t": [str(folder)]}, out_dir=str(tmp_path / "out"), progress=False, dedup=False
        )
    )
    assert [i["path"] for i in manifest["tasks"][0]["inputs"]] == [str(folder / "t.jsonl")]
    assert manifest["tasks"][0]["documents"] == 3


@pytest.mark.parametrize(
    "case",
    ["missing", "empty folder", "not jsonl", "plain named .gz", "gzip named .jsonl", "named twice"],
)
def test_every_input_is_checked_before_any_work(tmp_path, case):
    good = write_jsonl(tmp_path / "good.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    (tmp_path / "empty").mkdir()
    paths = {
        "missing": [tmp_path / "nope.jsonl"],
        "empty folder": [tmp_path / "empty"],
        "not jsonl": [write_raw(tmp_path / "t.csv", ["a,b"])],
        "plain named .gz": [write_jsonl(tmp_path / "p.jsonl.gz", ['{"messages": 1}'])],
        "gzip named .jsonl": [write_jsonl(tmp_path / "g.jsonl", ['{"messages": 1}'], gz=True)],
        "named twice": [tmp_path, good],
    }[case]
    expected = {
        "missing": "does not exist",
        "empty folder": "has no .jsonl",
        "not jsonl": "is not a .jsonl",
        "plain named .gz": "is not gzip-compressed",
        "gzip named .jsonl": "is gzip-compressed but named",
        "named twice": "is named twice",
    }[case]
    with pytest.raises(PreprocessError, match=expected):
        preprocess(
            PreprocessOptions(
                tasks={"ok": [str(good)], "t": [str(p) for p in paths]},
                out_dir=str(tmp_path / "out"),
                progress=False,
            )
        )
    assert not (tmp_path / "out").exists()


def _lines_before_damage(data: bytes) -> int:
    """Whole lines in the deflate stream, decoded raw without any check (an independent reading)."""
    return (
        zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[10:]).count(b"\n")
    )  # after gzip's 10-byte header


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_a_damaged_gzip_names_file_and_line_or_is_counted_under_skip(tmp_path, damage):
    lines = [
        as_line([("user", f"q{i}"), ("assistant", f"answer {i} " * 5)], "messages")
        for i in range(3000)
    ]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    data = (
        data[: len(data) // 2]
        if damage == "truncated"
        else data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]
    )
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data)
    whole = _lines_before_damage(data)
    other = write_jsonl(tmp_path / "other.jsonl", [as_line(CONVERSATIONS[0], "messages")])
    options = PreprocessOptions(
        tasks={"t": [str(path), str(other)]}, out_dir=str(tmp_path / "out"), progress=False
    )
    with pytest.raises(
        PreprocessError, match=f"{path}:{whole + 1}: the gzip (file is truncated|data is corrupt)"
    ):
        preprocess(options)
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {"corrupt_gzip": 1} and task["documents"] == whole + 1
    assert task["inputs"][0]["unread_from_line"] == whole + 1


def test_a_lone_surrogate_escape_is_a_bad_line_with_file_and_line(tmp_path):
    path = write_raw(
        tmp_path / "in.jsonl",
        [
            as_line(CONVERSATIONS[2], "messages"),
            '{"messages": [{"role": "user", "content": "a \\ud800 b"}, '
            '{"role": "assistant", "content": "c"}]}',
        ],
    )
    options = PreprocessOptions(
        tasks={"t": [str(path)]}, out_dir=str(tmp_path / "out"), progress=False
    )
    with pytest.raises(PreprocessError, match=f"{path}:2: .*unpaired surrogate"):
        preprocess(options)
    options.on_bad_line = "skip"
    assert preprocess(options)["tasks"][0]["dropped"] == {"invalid_utf8": 1}


def _folder_with_links(tmp_path: Path) -> Path:
    """A task folder: a file, a linked folder elsewhere, a link back to itself, other files and a broken link."""
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", [as_line(CONVERSATIONS[0], "messages")])
    write_jsonl(tmp_path / "elsewhere" / "x.jsonl", [as_line(CONVERSATIONS[1], "messages")])
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "sub").mkdir()
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "notes.txt").write_text("not data")
    (folder / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    return folder


def test_a_linked_folder_is_read_once_and_what_is_not_read_is_recorded(tmp_path):
    folder = _folder_with_links(tmp_path)
    manifest = preprocess(
        PreprocessOptions(tasks={"t": [str(folder)]}, out_dir=str(tmp_path / "out"), progress=False)
    )
    task = manifest["tasks"][0]
    assert [i["path"] for i in task["inputs"]] == [
        str(folder / "a.jsonl"),
        str(folder / "linked" / "x.jsonl"),
    ]
    assert task["documents"] == 2
    skipped = {Path(entry["path"]).name: entry["reason"] for entry in task["skipped_inputs"]}
    assert skipped == {
        "notes.txt": "not .jsonl, .jsonl.gz, .jsonl.zst or .parquet",
        "loop": "same folder as one already read",
        "gone.jsonl": "broken link",
    }
    assert task["skipped_input_count"] == 3


def test_the_cli_says_per_task_what_its_folders_hold_unread(tmp_path, capsys):
    from megamft.data.preprocess_cli import main

    folder = _folder_with_links(tmp_path)
    plain = write_jsonl(tmp_path / "plain" / "p.jsonl", [as_line(CONVERSATIONS[2], "messages")])
    assert (
        main(
            [
                "--task",
                f"t={folder}",
                "--task",
                f"p={plain.parent}",
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    said = [line for line in capsys.readouterr().out.splitlines() if "not read" in line]
    assert said == [
        "  t: its folders hold 3 entries not read: 1 broken link (gone.jsonl), 1 not .jsonl, .jsonl.gz, "
        ".jsonl.zst or .parquet (notes.txt), 1 same folder as one already read (loop); each is listed in manifest.json "
        "(tasks[0].skipped_inputs)"
    ]


def test_a_folder_without_data_names_what_it_holds(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "train.json").write_text("[]")
    (folder / "train.csv").write_text("a,b")
    with pytest.raises(
        PreprocessError,
        match=r"has no \.jsonl, \.jsonl\.gz, \.jsonl\.zst or \.parquet files .*; it holds "
        r"2 entries not read: 2 not \.jsonl, \.jsonl\.gz, \.jsonl\.zst or "
        r"\.parquet \(train\.csv, train\.json\)",
    ):
        preprocess(
            PreprocessOptions(
                tasks={"t": [str(folder)]}, out_dir=str(tmp_path / "out"), progress=False
            )
        )


def test_decontaminate_eval_takes_the_benchmarks_of_a_training_config(tmp_path, capsys):
    """--decontaminate-eval TRAIN.yaml decontaminates against every file of its eval.problems (an MBPP file here),
    and says so in the manifest; a config without eval.problems is refused by name."""
    problem = {
        "task_id": 2,
        "text": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n"
        "  return (res) ",
        "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
    }
    bench = write_jsonl(tmp_path / "mbpp.jsonl", [json.dumps(problem)])
    train = tmp_path / "train.yaml"
    train.write_text(f"eval:\n  problems:\n    mbpp: {bench}\n")
    leaked = as_line([("user", problem["text"]), ("assistant", problem["code"])], "messages")
    data = write_jsonl(
        tmp_path / "in.jsonl", [as_line(c, "messages") for c in CONVERSATIONS] + [leaked]
    )
    code, err = _cli(
        ["--task", f"t={data}", "--out", str(tmp_path / "out"), "--decontaminate-eval", str(train)],
        capsys,
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tasks"][0]["dropped"] == {"contaminated": 1}
    assert [b["path"] for b in manifest["decontaminated_against"]] == [str(bench.resolve())]
    train.write_text("train:\n  train_steps: 2\n")
    code, err = _cli(
        [
            "--task",
            f"t={data}",
            "--out",
            str(tmp_path / "out2"),
            "--decontaminate-eval",
            str(train),
        ],
        capsys,
    )
    assert code == 2 and f"--decontaminate-eval {train}: the config sets no eval.problems" in err
