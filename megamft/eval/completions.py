"""Model output -> the code that follows a HumanEval prompt."""

from __future__ import annotations

import re

# Where a plain completion of a function body ends (HumanEval's usual stop sequences).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
_FENCE = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def truncate_completion(text: str) -> str:
    """A plain completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def code_from_answer(text: str) -> str:
    """A chat answer's code: its first fenced block, else the whole answer.

    Appended after the prompt on a new line: a full `def` redefines the prompt's function
    (the prompt's stub with its docstring is a valid function), an indented body completes it.
    """
    match = _FENCE.search(text)
    return "\n" + (match.group(1) if match else text)
