"""What megamft-preprocess reads: task names and input files, checked before any work, and their lines.

Everything is validated before the first line is encoded: task names are safe,
distinct file names on any file system; every path exists and is a JSON Lines
file (plain or gzip, as its name says) or a folder holding some; no file is
named twice for a task. Only what the user named is read: a folder gives its
.jsonl/.jsonl.gz files, in its subfolders too (symbolic links followed, each real
folder and file read once), not hidden ones (`.ipynb_checkpoints/`, macOS
`._x.jsonl` copies); and an empty path (`--task a=x.jsonl,`) is an error, not the
current folder. What a folder holds and is not read (other files, hidden ones,
unreadable folders, broken links, a link back to a folder already read) is
listed with the reason, for the summary and the manifest.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megamft.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz")
_TASK_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?$")
MAX_TASK_NAME = 100
DERIVED_SUFFIXES = ("", "_loss_mask", "_task_id")  # each task writes <name><suffix>.bin/.idx
_GZIP_MAGIC = b"\x1f\x8b"


class PreprocessError(UserError, RuntimeError):
    """Bad input or options; the message names the file, line and what to do."""


def check_task_names(names: list[str]) -> None:
    """Names that give every task its own files, also on case-insensitive file systems."""
    owners: dict[str, tuple[str, str]] = {}  # casefolded file stem -> (task, stem)
    for name in names:
        if not isinstance(name, str) or not _TASK_NAME.match(name) or len(name) > MAX_TASK_NAME:
            raise PreprocessError(f"task name {name!r}: use at most {MAX_TASK_NAME} letters, digits, '_', '-', '.', "
                                  "starting with a letter or digit and not ending with '.' (it names the output files)")
        for suffix in DERIVED_SUFFIXES:
            stem = name + suffix
            other = owners.get(stem.casefold())
            if other is not None:
                same = (f"would both write {stem}.bin" if other[1] == stem else f"would write {other[1]}.bin and "
                        f"{stem}.bin, one file on a case-insensitive file system (macOS, Windows)")
                raise PreprocessError(f"tasks {other[0]!r} and {name!r} {same}; rename one of them")
            owners[stem.casefold()] = (name, stem)


@dataclass
class TaskInputs:
    """The files one task reads, in order, and what its folders hold that is not read."""

    files: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    """{"path", "reason"[, "detail"]} of each entry of a given folder that is not read."""


def input_files(task: str, paths: list[str]) -> list[Path]:
    """The files of one task, in order; PreprocessError for anything that is not a readable input."""
    return task_inputs(task, paths).files


def task_inputs(task: str, paths: list[str]) -> TaskInputs:
    """The files of one task and what its folders hold unread; PreprocessError for a bad input."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise PreprocessError(f"task {task}: expected a path or a list of paths, got {paths!r}")
    inputs = TaskInputs()
    for spec in paths:
        files, skipped = _files_of(task, spec)
        inputs.files += files
        inputs.skipped += skipped
    files = inputs.files
    seen: dict[Path, Path] = {}
    for path in files:
        key = path.resolve()
        if key in seen:
            raise PreprocessError(f"task {task}: {path} is named twice (also as {seen[key]}); "
                                  "its samples would be read twice. Name each file or folder once")
        seen[key] = path
    for path in files:
        _check_compression(task, path)
    return inputs


def _files_of(task: str, spec) -> tuple[list[Path], list[dict]]:
    if not isinstance(spec, str) or not spec.strip():
        raise PreprocessError(f"task {task}: an empty input path ({spec!r}); a stray comma in "
                              "--task NAME=PATH,PATH? Every path must name a file or a folder")
    path = Path(spec)
    if path.is_dir():
        found, skipped = folder_files(path)
        if not found:
            unread = f"; it holds {describe_skipped(skipped)}" if skipped else ""
            raise PreprocessError(f"task {task}: folder {path} has no .jsonl or .jsonl.gz files "
                                  f"(hidden files and folders are not read){unread}")
        return found, skipped
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise PreprocessError(f"task {task}: {path} is not a .jsonl or .jsonl.gz file; "
                                  "give JSON Lines files (plain or gzip) or folders holding them")
        return [path], []
    if path.exists():
        raise PreprocessError(f"task {task}: {path} is neither a file nor a folder")
    raise PreprocessError(f"task {task}: input {path} does not exist")


def folder_files(folder: Path) -> tuple[list[Path], list[dict]]:
    """The JSON Lines files under `folder`, sorted, links followed, each real folder and file once;
    and {"path", "reason"[, "detail"]} of every entry not read."""
    found: list[Path] = []
    skipped: list[dict] = []
    seen_folders: dict[Path, Path] = {}
    seen_files: dict[Path, Path] = {}

    def skip(path: Path, reason: str, detail: str | None = None) -> None:
        skipped.append({"path": str(path), "reason": reason, **({"detail": detail} if detail else {})})

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
            elif not entry.name.endswith(SUFFIXES):
                skip(path, "not .jsonl or .jsonl.gz")
            elif path.resolve() in seen_files:
                skip(path, "same file as one already read", str(seen_files[path.resolve()]))
            else:
                seen_files[path.resolve()] = path
                found.append(path)

    walk(folder)
    return sorted(found), skipped


def _is(test) -> bool:
    try:
        return test()  # follows links: a link to a folder is a folder
    except OSError:
        return False


def describe_skipped(skipped: list[dict], names: int = 3) -> str:
    """'3 entries not read: 2 not .jsonl or .jsonl.gz (a.txt, b.csv), 1 hidden (.DS_Store)'."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(entry["reason"], []).append(Path(entry["path"]).name)
    parts = [f"{len(files)} {reason} ({', '.join(files[:names])}{', ...' if len(files) > names else ''})"
             for reason, files in by_reason.items()]
    return f"{len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} not read: {', '.join(parts)}"


def _check_compression(task: str, path: Path) -> None:
    """A file is gzip exactly when its name ends in .gz."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as err:
        raise PreprocessError(f"task {task}: {path} cannot be read ({err.strerror})") from None
    named_gz = path.name.endswith(".gz")
    if named_gz and head and head != _GZIP_MAGIC:
        raise PreprocessError(f"task {task}: {path} is named .gz but is not gzip-compressed; rename it to .jsonl")
    if not named_gz and head == _GZIP_MAGIC:
        raise PreprocessError(f"task {task}: {path} is gzip-compressed but named .jsonl; rename it to .jsonl.gz")


def read_chunks(files: list[Path], chunk_lines: int) -> Iterator[tuple[str, int, list[bytes], str | None]]:
    """(file, number of the chunk's first line, raw lines, read error or None).

    A gzip file that is truncated or corrupt ends with a chunk carrying the
    error; the line after its last whole line is where it was found, and
    nothing after it is read.
    """
    for path in files:
        lines: list[bytes] = []
        first = 1
        try:
            with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    lines.append(line)
                    if len(lines) == chunk_lines:
                        yield str(path), first, lines, None
                        lines, first = [], number + 1
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            yield str(path), first, lines, gzip_problem(err)
            continue
        if lines:
            yield str(path), first, lines, None


def gzip_problem(err: Exception) -> str:
    if isinstance(err, EOFError):
        return "the gzip file is truncated (it ends before its end-of-stream marker)"
    return f"the gzip data is corrupt ({err})"
