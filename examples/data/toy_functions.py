"""A templated toy task the CPU quickstart's tiny model can learn, with held-out problems to evaluate it on.

Each problem is a one-line Python function named after what it does and a constant:
    def add_37(x):
        \"\"\"Return x plus 37.\"\"\"
The answer is the function with its body (`return x + 37`). Four operations (add, sub, mul, const) and the
constants 0..19 make 80 functions; those whose constant ends in 3 (8) are held out, the other 72 are training
conversations. Two HumanEval-format problem files with tests come with them: toy_functions_heldout.jsonl
(the 8 held out: passing needs the template and copying the constant from the prompt) and
toy_functions_seen.jsonl (16 of the training functions, constants 1, 5, 9, 17: their solutions are in the
training data, so passing them is memorisation). Neither measures coding ability; they show the
in-training evaluation and model selection at work on a model this small.

    python examples/data/toy_functions.py --train data/toy/toy_functions.jsonl --problems examples/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OPERATIONS = {  # name -> (docstring, body); {n} is the constant
    "add": ("Return x plus {n}.", "return x + {n}"),
    "sub": ("Return x minus {n}.", "return x - {n}"),
    "mul": ("Return x times {n}.", "return x * {n}"),
    "const": ("Return {n}.", "return {n}"),
}
CHECKS = (0, 1, -4, 12)
"""Arguments every held-out problem's test calls the function with."""


CONSTANTS = range(20)


def held_out(n: int) -> bool:
    return n % 10 == 3


def seen(n: int) -> bool:
    """Training functions also evaluated (memorisation)."""
    return n % 4 == 1 and not held_out(n)


def prompt(op: str, n: int) -> str:
    doc, _ = OPERATIONS[op]
    return f'def {op}_{n}(x):\n    """{doc.format(n=n)}"""\n'


def solution(op: str, n: int) -> str:
    return f"    {OPERATIONS[op][1].format(n=n)}\n"


def problem(op: str, n: int) -> dict:
    """A HumanEval-format problem whose test compares the candidate with the operation on CHECKS."""
    expected = {
        x: eval(OPERATIONS[op][1].format(n=n).removeprefix("return "), {"x": x}) for x in CHECKS
    }
    asserts = "".join(f"    assert candidate({x}) == {y}\n" for x, y in expected.items())
    return {
        "task_id": f"Toy/{op}_{n}",
        "prompt": prompt(op, n),
        "canonical_solution": solution(op, n),
        "test": f"def check(candidate):\n{asserts}",
        "entry_point": f"{op}_{n}",
    }


def conversation(op: str, n: int) -> dict:
    """A training sample: the prompt as the user turn, the whole function as the answer (MFTCoder's schema)."""
    answer = f"def {op}_{n}(x):\n{solution(op, n)}".rstrip("\n")
    return {
        "chat_rounds": [
            {"role": "human", "content": prompt(op, n)},
            {"role": "bot", "content": answer},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--train", type=Path, help="write the 72 training conversations here (.jsonl)"
    )
    parser.add_argument(
        "--problems",
        type=Path,
        metavar="FOLDER",
        help="write toy_functions_heldout.jsonl and toy_functions_seen.jsonl into this folder",
    )
    args = parser.parse_args()
    pairs = [(op, n) for op in OPERATIONS for n in CONSTANTS]
    problems = args.problems
    for path, lines in (
        (args.train, [conversation(*p) for p in pairs if not held_out(p[1])]),
        (
            problems and problems / "toy_functions_heldout.jsonl",
            [problem(*p) for p in pairs if held_out(p[1])],
        ),
        (
            problems and problems / "toy_functions_seen.jsonl",
            [problem(*p) for p in pairs if seen(p[1])],
        ),
    ):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
            print(f"wrote {len(lines)} lines to {path}")


if __name__ == "__main__":
    main()
