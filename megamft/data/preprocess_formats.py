"""The record files megamft-preprocess reads besides plain JSON Lines: gzip and zstd JSON Lines, Parquet;
and the column mapping that names the record fields in them.

A record's fields (messages, chat_rounds, prompt/answer pairs, system, text:
conversation.py) are read from the columns of the same names, or from the
columns `--columns FIELD=COLUMN` names (`--columns text=content` reads a
Hugging Face code dataset's `content` column as the document). A Parquet file
is read in batches of rows, one row group in memory at a time, only the
columns that hold record fields; a null value is an absent field. Damage found
while reading (a truncated or corrupt compressed stream, an unreadable Parquet
page) ends that file with a DamagedInput naming where it was found.
zstandard and pyarrow are optional (the `data` extra); a run that needs one
and lacks it is refused before any work, with the command that installs it.
"""

from __future__ import annotations

import gzip
import importlib
import zlib
from pathlib import Path
from typing import Iterator

from megamft.data.conversation import (
    PAIR_FIELDS,
    SCHEMA_KEYS,
    TEXT_KEY,
    BadSample,
    Sample,
    load_line,
    parse_record,
)
from megamft.errors import MissingPackage, UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
RECORD_SUFFIXES = (*JSONL_SUFFIXES, PARQUET_SUFFIX)
RECORD_FILES = ".jsonl, .jsonl.gz, .jsonl.zst or .parquet"
RECORD_FIELDS = tuple(
    dict.fromkeys((*SCHEMA_KEYS, *(f for pair in PAIR_FIELDS for f in pair), "system", TEXT_KEY))
)
"""Every top-level field some record format reads."""
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK = 1 << 16  # compressed bytes read at a time: the decompressed piece in memory stays small


class PreprocessError(UserError, RuntimeError):
    """Bad input or options; the message names the file, line and what to do."""


class DamagedInput(Exception):
    """A file ends in damage found while reading it; the message says what was found."""


def require(package: str, what: str):
    """The optional `package`, or MissingPackage naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackage(
            f"{what} needs the {package} package, which is not installed: "
            f"pip install 'megamft[data]' (or pip install {package})"
        ) from None


def columns_text(columns: dict[str, str]) -> str:
    return ",".join(f"{f}={c}" for f, c in columns.items())


def check_columns(columns) -> dict[str, str]:
    """--columns FIELD=COLUMN: each FIELD a record field, each COLUMN named once."""
    if not isinstance(columns, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in columns.items()
    ):
        raise PreprocessError(
            f"--columns {columns!r}: expected FIELD=COLUMN pairs (a mapping in --config)"
        )
    unknown = sorted(set(columns) - set(RECORD_FIELDS))
    if unknown:
        raise PreprocessError(
            f"--columns: {', '.join(unknown)} is not a record field; the fields are "
            f"{', '.join(RECORD_FIELDS)} (--columns FIELD=COLUMN reads FIELD from COLUMN)"
        )
    if len(set(columns.values())) < len(columns):
        raise PreprocessError(
            f"--columns {columns_text(columns)}: a column is named for two fields; name each once"
        )
    return dict(columns)


class RecordParser:
    """A worker's reading of one item: a JSON line (bytes) or a record already read (a dict), into a Sample."""

    def __init__(self, columns: dict[str, str]):
        self.columns = columns

    def __call__(self, item) -> Sample:
        if isinstance(item, dict):
            return parse_record(item)
        if not self.columns:
            return parse_record(load_line(item))
        record = load_line(item)
        if not isinstance(record, dict):
            return parse_record(record)
        try:
            return parse_record(project(record, self.columns))
        except BadSample as err:
            if err.kind != "missing_field":
                raise
            raise BadSample(
                err.kind,
                f"{err} (read with --columns {columns_text(self.columns)}; "
                f"the line's fields: {', '.join(map(str, record)) or 'none'})",
            ) from None


def project(record: dict, columns: dict[str, str]) -> dict:
    """The record fields of `record`, each from its mapped column; other fields are not read."""
    return {field: record[column] for field, column in field_columns(columns) if column in record}


def field_columns(columns: dict[str, str]) -> list[tuple[str, str]]:
    """(record field, the column it is read from) for every field; a column mapped to a field is not also
    read as the field of its own name (`--columns prompt=question` does not read a `question` field)."""
    mapped = set(columns.values())
    return [
        (f, columns[f]) if f in columns else (f, f)
        for f in RECORD_FIELDS
        if f in columns or f not in mapped
    ]


def check_record_file(task: str, path: Path, columns: dict[str, str]) -> None:
    """Named as its content is (gzip, zstd, Parquet), its reader installed, a Parquet file's columns there."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise PreprocessError(f"task {task}: {path} cannot be read ({err.strerror})") from None
    name = path.name
    compressed = {".gz": GZIP_MAGIC, ".zst": ZSTD_MAGIC}
    for suffix, magic in compressed.items():
        kind = "gzip" if suffix == ".gz" else "zstd"
        if name.endswith(suffix) and head and not head.startswith(magic):
            raise PreprocessError(
                f"task {task}: {path} is named {suffix} but is not {kind}-compressed; "
                "rename it to .jsonl"
            )
        if name.endswith(".jsonl") and head.startswith(magic):
            raise PreprocessError(
                f"task {task}: {path} is {kind}-compressed but named .jsonl; "
                f"rename it to .jsonl{suffix}"
            )
    if name.endswith(".zst"):
        require("zstandard", f"reading {path}")
    if name.endswith(PARQUET_SUFFIX):
        parquet_fields(task, path, columns)


def parquet_fields(task: str | None, path: Path, columns: dict[str, str]) -> dict[str, str]:
    """{record field: Parquet column} of the file; PreprocessError if it is not Parquet or lacks a mapped column."""
    pq = require("pyarrow.parquet", f"reading {path}")
    task = f"task {task}: " if task else ""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except _arrow_errors() as err:
        raise PreprocessError(
            f"{task}{path} is not a readable Parquet file ({err}); re-create it or leave it out"
        ) from None
    missing = [f"{f}={c}" for f, c in columns.items() if c not in names]
    if missing:
        raise PreprocessError(
            f"{task}{path} has no column for --columns {', '.join(missing)}; "
            f"its columns: {', '.join(names)}"
        )
    fields = {f: c for f, c in field_columns(columns) if c in names}
    if not fields:
        raise PreprocessError(
            f"{task}{path} has no column of a record field ({', '.join(RECORD_FIELDS)}); "
            f"its columns: {', '.join(names)}. Map one with --columns FIELD=COLUMN, "
            "e.g. --columns text=content"
        )
    return fields


def _arrow_errors() -> tuple[type[BaseException], ...]:
    """What pyarrow raises for a file or page it cannot read (ArrowInvalid is a ValueError, ArrowIOError an
    OSError)."""
    import pyarrow

    return (pyarrow.ArrowException, OSError, ValueError)


def json_lines(path: Path) -> Iterator[bytes]:
    """The lines of a plain, gzip or zstd JSON Lines file; DamagedInput where its compressed data ends badly."""
    if path.name.endswith(".zst"):
        yield from _zstd_lines(path)
        return
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            yield from f
    except EOFError:
        raise DamagedInput(
            "the gzip file is truncated (it ends before its end-of-stream marker)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DamagedInput(f"the gzip data is corrupt ({err})") from None


def _zstd_lines(path: Path) -> Iterator[bytes]:
    """Lines across every zstd frame of the file; a file that ends inside a frame is truncated."""
    zstd = require("zstandard", f"reading {path}")
    pending, fed = b"", False
    stream = zstd.ZstdDecompressor().decompressobj()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            while block:
                try:
                    data = stream.decompress(block)
                except zstd.ZstdError as err:
                    raise DamagedInput(f"the zstd data is corrupt ({err})") from None
                fed = True
                *lines, pending = (pending + data).split(b"\n")
                yield from lines
                block = b""
                if stream.eof:  # the next frame starts in what this one left
                    block, stream, fed = (
                        stream.unused_data,
                        zstd.ZstdDecompressor().decompressobj(),
                        False,
                    )
    if fed and not stream.eof:
        raise DamagedInput("the zstd file is truncated (it ends inside a frame)")
    if pending:
        yield pending


def parquet_batches(path: Path, columns: dict[str, str], rows: int) -> Iterator[list[dict]]:
    """Lists of up to `rows` records, one row group at a time; a null value is an absent field.

    Page checksums are verified where the writer stored them, so damage shows
    as an error at the row group that holds it, not as altered text.
    """
    pq = require("pyarrow.parquet", f"reading {path}")
    fields = parquet_fields(None, path, columns)
    by_column = {column: field for field, column in fields.items()}
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
            for group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(
                    batch_size=rows, row_groups=[group], columns=list(by_column), use_threads=False
                ):
                    yield [
                        {by_column[c]: v for c, v in row.items() if v is not None}
                        for row in batch.to_pylist()
                    ]
    except _arrow_errors() as err:
        raise DamagedInput(f"the Parquet data cannot be read ({err})") from None
