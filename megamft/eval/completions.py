"""Model output -> the code that follows a problem's prompt."""

from __future__ import annotations

import re

# Where a plain completion of a function body ends (HumanEval's usual stop sequences).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
_FENCE = re.compile(r"```(?:[\w+#.-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def truncate_completion(text: str, stops: tuple[str, ...] = (), kept: bool = False) -> str:
    """A plain completion up to the first stop sequence (Python's by default); `kept`: the stop sequence
    itself stays (a closing brace that ends the function)."""
    found = [(i, s) for s in (stops or STOP_SEQUENCES) if (i := text.find(s)) >= 0]
    if not found:
        return text
    cut, stop = min(found)
    return text[: cut + (len(stop) if kept else 0)]


def code_from_answer(text: str) -> str:
    """A chat answer's code: its first fenced block, else the whole answer.

    Appended after the prompt on a new line: a full `def` redefines the prompt's function
    (the prompt's stub with its docstring is a valid function), an indented body completes it.
    """
    match = _FENCE.search(text)
    return "\n" + (match.group(1) if match else text)
