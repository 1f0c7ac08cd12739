"""The embedded multitask code corpus, built from Python's own standard library.

Every function with a docstring in the stdlib sources on this machine yields
up to three samples:
  code_completion    first lines of a function -> the rest of it
  text_to_code       signature and docstring   -> the function without docstring
  code_to_docstring  the function without docstring -> its docstring
No network, no downloads, deterministic for a given Python version.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path
from typing import Iterator

TASKS = ("code_completion", "text_to_code", "code_to_docstring")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip"}


def stdlib_files(seed: int) -> list[Path]:
    """Stdlib .py files in a seeded order (so any prefix is a mixed sample)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    random.Random(seed).shuffle(files)
    return files


def _functions(path: Path) -> Iterator[tuple[str, str]]:
    """(source without docstring, docstring) of each documented function in a file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or node.decorator_list:
            continue
        doc_node = node.body[0]
        indent = node.col_offset
        kept = (
            lines[node.lineno - 1 : doc_node.lineno - 1]
            + lines[doc_node.end_lineno : node.end_lineno]
        )
        code = "\n".join(line[indent:] for line in kept)
        yield code, doc.strip()


def _samples_for(code: str, doc: str) -> dict[str, list[dict]]:
    code_lines = code.splitlines()
    signature = code_lines[0]
    cut = max(1, len(code_lines) // 3)
    return {
        "code_completion": [
            {
                "role": "human",
                "content": "Complete this Python function:\n" + "\n".join(code_lines[:cut]),
            },
            {"role": "bot", "content": "\n".join(code_lines[cut:])},
        ],
        "text_to_code": [
            {
                "role": "human",
                "content": f"Write a Python function `{signature}` that does this:\n{doc}",
            },
            {"role": "bot", "content": code},
        ],
        "code_to_docstring": [
            {"role": "human", "content": "Write the docstring of this function:\n" + code},
            {"role": "bot", "content": doc},
        ],
    }


def build_corpus(max_chars: int, samples_per_task: int, seed: int) -> dict[str, list[list[dict]]]:
    """Conversations per task; each fits in max_chars characters of content."""
    corpus: dict[str, list[list[dict]]] = {task: [] for task in TASKS}
    for path in stdlib_files(seed):
        for code, doc in _functions(path):
            for task, turns in _samples_for(code, doc).items():
                size = sum(len(t["content"]) for t in turns)
                if size <= max_chars and len(corpus[task]) < samples_per_task:
                    corpus[task].append(turns)
        if all(len(v) >= samples_per_task for v in corpus.values()):
            break
    return corpus
