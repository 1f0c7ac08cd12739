"""megamft-preprocess's output folder: a killed or failing run leaves no file that looks complete,
a second run is refused while one runs, and folders megamft did not write (or its inputs) are never touched."""

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import CONVERSATIONS, as_line, run_preprocess, write_jsonl

from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess


def _start_slow_run(tmp_path: Path, out: Path) -> subprocess.Popen:
    """A megamft-preprocess process that is still writing `out` (its .partial files exist) when this returns."""
    import time

    lines = [
        as_line([("user", f"question {i}"), ("assistant", "an answer " * 50 + str(i))], "messages")
        for i in range(60_000)
    ]
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    proc = subprocess.Popen(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--task",
            f"a={path}",
            "--task",
            f"b={path}",
            "--out",
            str(out),
            "--quiet",
            "--no-dedup",
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.time() + 60
    while not (out.exists() and any(p.name.endswith(".partial") for p in out.iterdir())):
        assert proc.poll() is None and time.time() < deadline, (
            "the run ended before it could be caught running"
        )
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
        [".megamft-output.json", "manifest.json"]
        + [f"a{s}.{e}" for s in ("", "_loss_mask", "_task_id") for e in ("bin", "idx")]
    )


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_run(tmp_path, out)
    try:
        small = write_jsonl(
            tmp_path / "small.jsonl", [as_line(c, "messages") for c in CONVERSATIONS]
        )
        with pytest.raises(
            PreprocessError, match=f"in use by another megamft preprocess run: pid {proc.pid} "
        ):
            preprocess(
                PreprocessOptions(tasks={"a": [str(small)]}, out_dir=str(out), progress=False)
            )
        assert proc.wait(timeout=300) == 0  # the first run was not disturbed
    finally:
        proc.kill()
        proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["documents"] for t in manifest["tasks"]] == [60_000, 60_000]


def _tree(root: Path) -> dict:
    """Every file under root with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_out_with_files_megamft_did_not_write_is_refused_unless_overwrite(tmp_path):
    path = write_jsonl(tmp_path / "in" / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    out = tmp_path / "home"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "chapter1.tex").write_text("years of work")
    options = PreprocessOptions(tasks={"t": [str(path)]}, out_dir=str(out), progress=False)
    with pytest.raises(
        PreprocessError, match="is not empty and holds files that megamft did not write"
    ):
        preprocess(options)
    assert _tree(out) == {"thesis/chapter1.tex": b"years of work"}
    options.overwrite = True
    assert preprocess(options)["tasks"][0]["documents"] == 3
    assert (
        out / "thesis" / "chapter1.tex"
    ).read_text() == "years of work"  # --overwrite deletes nothing it did not write


def test_a_previous_output_is_replaced_without_overwrite_and_its_other_tasks_removed(tmp_path):
    """An older output (manifest.json, no marker) is recognised; files of tasks no longer given go."""
    out, _ = run_preprocess(
        tmp_path,
        {
            "a": [as_line(c, "messages") for c in CONVERSATIONS],
            "b": [as_line(CONVERSATIONS[0], "messages")],
        },
    )
    (out / ".megamft-output.json").unlink(missing_ok=True)  # as written before the marker existed
    path = write_jsonl(tmp_path / "in2" / "a.jsonl", [as_line(CONVERSATIONS[1], "messages")])
    manifest = preprocess(
        PreprocessOptions(tasks={"a": [str(path)]}, out_dir=str(out), progress=False)
    )
    assert [t["documents"] for t in manifest["tasks"]] == [1]
    assert not any(p.name.startswith("b") for p in out.iterdir())


@pytest.mark.parametrize(
    "where",
    ["the input folder", "inside the input folder", "above the input file", "the tokenizer folder"],
)
def test_out_that_holds_equals_or_lies_inside_an_input_is_refused_even_with_overwrite(
    tmp_path, tokenizers, where
):
    import shutil

    inputs = tmp_path / "data"
    write_jsonl(inputs / "t.jsonl", [as_line(c, "messages") for c in CONVERSATIONS])
    shutil.copytree(Path(tokenizers["huggingface"]).parent, tmp_path / "tok")
    task = str(inputs / "t.jsonl") if where == "above the input file" else str(inputs)
    out = {
        "the input folder": inputs,
        "inside the input folder": inputs / "indexed",
        "above the input file": tmp_path,
        "the tokenizer folder": tmp_path / "tok",
    }[where]
    before = _tree(tmp_path)
    with pytest.raises(PreprocessError, match="input"):
        preprocess(
            PreprocessOptions(
                tasks={"t": [task]},
                out_dir=str(out),
                tokenizer=str(tmp_path / "tok"),
                overwrite=True,
                progress=False,
            )
        )
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


def test_a_full_disk_stops_the_run_removes_its_partial_files_and_keeps_the_previous_output(
    tmp_path, monkeypatch
):
    from megamft.data import indexed

    lines = [
        as_line([("user", f"question {i}"), ("assistant", f"answer {i} " * 20)], "messages")
        for i in range(200)
    ]
    out, _ = run_preprocess(tmp_path, {"t": lines})
    previous = _tree(out)
    room = [
        30_000
    ]  # full in mid-run, with small chunks still in the writers' buffers: their close fails too
    monkeypatch.setattr(
        indexed,
        "open",
        lambda path, mode: io.BufferedWriter(_DiskWithRoom(path, room)),
        raising=False,
    )
    with pytest.raises((PreprocessError, OSError)) as err:
        preprocess(
            PreprocessOptions(
                tasks={
                    "t": [str(tmp_path / "in" / "t.jsonl")],
                    "u": [str(tmp_path / "in" / "t.jsonl")],
                },
                out_dir=str(out),
                chunk_lines=16,
                progress=False,
            )
        )
    assert _tree(out) == previous  # no .partial file left, the previous output as it was
    assert isinstance(err.value, PreprocessError) and "No space left on device" in str(err.value)
