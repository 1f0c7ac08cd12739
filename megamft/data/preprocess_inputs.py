"""What megamft-preprocess reads: task names and input files, checked before any work, and their lines.

Everything is validated before the first line is encoded: task names are safe,
distinct file names on any file system; every path exists and is a JSON Lines
file (plain or gzip, as its name says) or a folder holding some; no file is
named twice for a task. Only what the user named is read: a folder gives its
.jsonl/.jsonl.gz files, not hidden ones (`.ipynb_checkpoints/`, macOS `._x.jsonl`
copies), and an empty path (`--task a=x.jsonl,`) is an error, not the current folder.
"""

from __future__ import annotations

import gzip
import re
import zlib
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


def input_files(task: str, paths: list[str]) -> list[Path]:
    """The files of one task, in order; PreprocessError for anything that is not a readable input."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise PreprocessError(f"task {task}: expected a path or a list of paths, got {paths!r}")
    files: list[Path] = []
    for spec in paths:
        files += _files_of(task, spec)
    seen: dict[Path, Path] = {}
    for path in files:
        key = path.resolve()
        if key in seen:
            raise PreprocessError(f"task {task}: {path} is named twice (also as {seen[key]}); "
                                  "its samples would be read twice. Name each file or folder once")
        seen[key] = path
    for path in files:
        _check_compression(task, path)
    return files


def _files_of(task: str, spec) -> list[Path]:
    if not isinstance(spec, str) or not spec.strip():
        raise PreprocessError(f"task {task}: an empty input path ({spec!r}); a stray comma in "
                              "--task NAME=PATH,PATH? Every path must name a file or a folder")
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise PreprocessError(f"task {task}: folder {path} has no .jsonl or .jsonl.gz files "
                                  "(hidden files and folders are not read)")
        return found
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise PreprocessError(f"task {task}: {path} is not a .jsonl or .jsonl.gz file; "
                                  "give JSON Lines files (plain or gzip) or folders holding them")
        return [path]
    if path.exists():
        raise PreprocessError(f"task {task}: {path} is neither a file nor a folder")
    raise PreprocessError(f"task {task}: input {path} does not exist")


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
