"""What megamft-preprocess reads: task names and input files, checked before any work, and their lines.

Everything is validated before the first line is encoded: task names are safe,
distinct file names on any file system; every path exists and is a record file
(JSON Lines, plain, gzip or zstd as its name says, or Parquet with the record
fields' columns: preprocess_formats.py) or a folder holding some, or a
`sources:FOLDER` of source files (preprocess_sources.py); no file is named
twice for a task. Only what the user named is read: a folder gives its record
files, in its subfolders too (symbolic links followed, each real
folder and file read once), not hidden ones (`.ipynb_checkpoints/`, macOS
`._x.jsonl` copies); and an empty path (`--task a=x.jsonl,`) is an error, not the
current folder. What a folder holds and is not read (other files, hidden ones,
unreadable folders, broken links, a link back to a folder already read) is
listed with the reason, for the summary and the manifest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from megamft.data.preprocess_formats import (
    PARQUET_SUFFIX,
    RECORD_FILES,
    RECORD_SUFFIXES,
    DamagedInput,
    PreprocessError,
    check_record_file,
    json_lines,
    parquet_batches,
)
from megamft.data.preprocess_sources import SourceRules, read_document, skip_reason, source_folder

SUFFIXES = RECORD_SUFFIXES
_TASK_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?$")
MAX_TASK_NAME = 100
DERIVED_SUFFIXES = ("", "_loss_mask", "_task_id")  # each task writes <name><suffix>.bin/.idx
_DAMAGE_KINDS = {".gz": "corrupt_gzip", ".zst": "corrupt_zstd", PARQUET_SUFFIX: "corrupt_parquet"}


def check_task_names(names: list[str]) -> None:
    """Names that give every task its own files, also on case-insensitive file systems."""
    owners: dict[str, tuple[str, str]] = {}  # casefolded file stem -> (task, stem)
    for name in names:
        if not isinstance(name, str) or not _TASK_NAME.match(name) or len(name) > MAX_TASK_NAME:
            raise PreprocessError(
                f"task name {name!r}: use at most {MAX_TASK_NAME} letters, digits, '_', '-', '.', "
                "starting with a letter or digit and not ending with '.' (it names the output files)"
            )
        for suffix in DERIVED_SUFFIXES:
            stem = name + suffix
            other = owners.get(stem.casefold())
            if other is not None:
                same = (
                    f"would both write {stem}.bin"
                    if other[1] == stem
                    else f"would write {other[1]}.bin and "
                    f"{stem}.bin, one file on a case-insensitive file system (macOS, Windows)"
                )
                raise PreprocessError(f"tasks {other[0]!r} and {name!r} {same}; rename one of them")
            owners[stem.casefold()] = (name, stem)


@dataclass
class TaskInputs:
    """The files one task reads, in order, and what its folders hold that is not read."""

    files: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    """{"path", "reason"[, "detail"]} of each entry of a given folder that is not read."""
    sources: set[Path] = field(default_factory=set)
    """The files (of `sources:` folders) read as one document each."""
    columns: dict[str, str] = field(default_factory=dict)
    """Record field -> the column it is read from, where not the field's own name."""


def input_files(task: str, paths: list[str]) -> list[Path]:
    """The plain and gzip JSON Lines files of one task, in order; PreprocessError for anything else."""
    files = task_inputs(task, paths).files
    for path in files:
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            raise PreprocessError(f"{path}: only .jsonl and .jsonl.gz files are read here")
    return files


def task_inputs(
    task: str,
    paths: list[str],
    columns: dict[str, str] | None = None,
    rules: SourceRules | None = None,
) -> TaskInputs:
    """The files of one task and what its folders hold unread; PreprocessError for a bad input."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise PreprocessError(f"task {task}: expected a path or a list of paths, got {paths!r}")
    inputs = TaskInputs(columns=dict(columns or {}))
    for spec in paths:
        files, skipped = _files_of(task, spec, rules or SourceRules())
        if source_folder(spec) is not None:
            inputs.sources.update(files)
        inputs.files += files
        inputs.skipped += skipped
    files = inputs.files
    seen: dict[Path, Path] = {}
    for path in files:
        key = path.resolve()
        if key in seen:
            raise PreprocessError(
                f"task {task}: {path} is named twice (also as {seen[key]}); "
                "its samples would be read twice. Name each file or folder once"
            )
        seen[key] = path
    for path in files:
        if path not in inputs.sources:
            check_record_file(task, path, inputs.columns)
    return inputs


def _files_of(task: str, spec, rules: SourceRules) -> tuple[list[Path], list[dict]]:
    if not isinstance(spec, str) or not spec.strip() or spec.strip() == "sources:":
        raise PreprocessError(
            f"task {task}: an empty input path ({spec!r}); a stray comma in "
            "--task NAME=PATH,PATH? Every path must name a file or a folder"
        )
    sources = source_folder(spec)
    if sources is not None:
        if not sources.is_dir():
            raise PreprocessError(
                f"task {task}: {spec}: {sources} is not a folder (sources:FOLDER reads "
                "the source files under a folder)"
            )
        found, skipped = folder_files(sources, lambda path: skip_reason(path, rules))
        if not found:
            raise PreprocessError(
                f"task {task}: folder {sources} has no source file to read (hidden files and "
                f"folders are not read){'; it holds ' + describe_skipped(skipped) if skipped else ''}"
            )
        return found, skipped
    path = Path(spec)
    if path.is_dir():
        found, skipped = folder_files(path)
        if not found:
            unread = f"; it holds {describe_skipped(skipped)}" if skipped else ""
            raise PreprocessError(
                f"task {task}: folder {path} has no {RECORD_FILES} files "
                f"(hidden files and folders are not read; sources:{path} reads "
                f"source files){unread}"
            )
        return found, skipped
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise PreprocessError(
                f"task {task}: {path} is not a {RECORD_FILES} file; give record files "
                "or folders holding them (or sources:FOLDER for a folder of source files)"
            )
        return [path], []
    if path.exists():
        raise PreprocessError(f"task {task}: {path} is neither a file nor a folder")
    raise PreprocessError(f"task {task}: input {path} does not exist")


def _record_file(path: Path) -> tuple[str, None] | None:
    return None if path.name.endswith(SUFFIXES) else (f"not {RECORD_FILES}", None)


def folder_files(
    folder: Path, skip_reason: Callable[[Path], tuple[str, str | None] | None] = _record_file
) -> tuple[list[Path], list[dict]]:
    """The files under `folder` that `skip_reason` keeps (record files by default), sorted, links followed,
    each real folder and file once; and {"path", "reason"[, "detail"]} of every entry not read."""
    found: list[Path] = []
    skipped: list[dict] = []
    seen_folders: dict[Path, Path] = {}
    seen_files: dict[Path, Path] = {}

    def skip(path: Path, reason: str, detail: str | None = None) -> None:
        skipped.append(
            {"path": str(path), "reason": reason, **({"detail": detail} if detail else {})}
        )

    def walk(directory: Path) -> None:
        real = directory.resolve()
        if real in seen_folders:
            return skip(directory, "same folder as one already read", str(seen_folders[real]))
        seen_folders[real] = directory
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as err:
            return skip(directory, "unreadable folder", err.strerror)
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                skip(path, "hidden")
            elif _is(entry.is_dir):
                walk(path)
            elif not _is(entry.is_file):
                skip(path, "broken link" if entry.is_symlink() else "not a regular file")
            elif (real := path.resolve()) in seen_files:
                skip(path, "same file as one already read", str(seen_files[real]))
            elif (reason := skip_reason(path)) is not None:
                skip(path, *reason)
            else:
                seen_files[real] = path
                found.append(path)

    walk(folder)
    return sorted(found), skipped


def _is(test) -> bool:
    try:
        return test()  # follows links: a link to a folder is a folder
    except OSError:
        return False


def describe_skipped(skipped: list[dict], names: int = 3) -> str:
    """'3 entries not read: 2 not .jsonl, .jsonl.gz, .jsonl.zst or .parquet (a.txt, b.csv), 1 hidden (.DS_Store)'."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(entry["reason"], []).append(Path(entry["path"]).name)
    parts = [
        f"{len(files)} {reason} ({', '.join(files[:names])}{', ...' if len(files) > names else ''})"
        for reason, files in by_reason.items()
    ]
    return f"{len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} not read: {', '.join(parts)}"


def damage_kind(file: str) -> str:
    """How a file that ends in damage is counted under --on-bad-line skip: corrupt_gzip, corrupt_zstd, ..."""
    return next(
        (kind for suffix, kind in _DAMAGE_KINDS.items() if file.endswith(suffix)), "unreadable_file"
    )


def read_chunks(
    inputs: TaskInputs | list[Path], chunk_lines: int, rules: SourceRules | None = None
) -> Iterator[tuple[str, int, list, str | None]]:
    """(file, number of the chunk's first line or row, items, read error or None), in input order.

    An item is a raw JSON line (bytes) or a record (a dict: a Parquet row, a
    source file's {"text": ...}); a source file is a chunk of its own, so that
    a message about it names it. A file that is truncated or corrupt ends with
    a chunk carrying the error; the line after its last whole line (or the
    first row of the batch that could not be read) is where it was found, and
    nothing after it is read.
    """
    if not isinstance(inputs, TaskInputs):
        inputs = TaskInputs(files=list(inputs))
    for path in inputs.files:
        if path in inputs.sources:
            yield str(path), 1, [read_document(path, rules or SourceRules())], None
        elif path.name.endswith(PARQUET_SUFFIX):
            yield from _chunks(path, _parquet_rows(path, inputs.columns, chunk_lines), chunk_lines)
        else:
            yield from _chunks(path, json_lines(path), chunk_lines)


def _parquet_rows(path: Path, columns: dict[str, str], chunk_lines: int) -> Iterator[dict]:
    for batch in parquet_batches(path, columns, chunk_lines):
        yield from batch


def _chunks(
    path: Path, items: Iterator, chunk_lines: int
) -> Iterator[tuple[str, int, list, str | None]]:
    chunk: list = []
    first = 1
    try:
        for number, item in enumerate(items, start=1):
            chunk.append(item)
            if len(chunk) == chunk_lines:
                yield str(path), first, chunk, None
                chunk, first = [], number + 1
    except DamagedInput as err:
        yield str(path), first, chunk, str(err)
        return
    if chunk:
        yield str(path), first, chunk, None
