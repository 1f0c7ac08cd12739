"""Problems in other languages (HumanEval-X and MultiPL-E files for C++, Java, JavaScript, Go) and MBPP:
read, completed, built and run in the sandbox with the language's toolchain; refused by name without it.

Each test writes a small problem file; the completions come from a generator that answers a fixed text
(the model is not what is tested here), encoded with the byte tokenizer so that they go through the same
decoding, cutting and program assembly as a model's. The right answer must pass and a wrong one fail.
"""

import json
import shutil

import pytest

from megamft.data.tokenizer import ByteTokenizer
from megamft.eval.humaneval import EvalSettings, evaluate
from megamft.eval.languages import MissingToolchain
from megamft.eval.problems import BadProblemFile, load_problems
from megamft.eval.sandbox import Limits, Sandbox

ADD_CPP = {
    "task_id": "CPP/0",
    "prompt": "#include<vector>\nusing namespace std;\nint add(int a, int b){\n",
    "canonical_solution": "    return a + b;\n}\n",
    "test": "#undef NDEBUG\n#include<assert.h>\nint main(){\n    assert(add(2, 3) == 5);\n}\n",
}
ADD_JAVA = {
    "task_id": "Java/0",
    "prompt": "import java.util.*;\n\nclass Solution {\n    public int add(int a, int b) {\n",
    "canonical_solution": "        return a + b;\n    }\n}",
    "test": "public class Main {\n    public static void main(String[] args) {\n        Solution s = new Solution();\n"
    "        if (s.add(2, 3) != 5) throw new AssertionError();\n    }\n}\n",
}
ADD_JS = {
    "task_id": "JavaScript/0",
    "prompt": "const add = (a, b) => {\n",
    "canonical_solution": "  return a + b;\n}\n",
    "test": "const testAdd = () => {\n  console.assert(add(2, 3) === 5)\n}\ntestAdd()\n",
}
ADD_GO = {
    "name": "HumanEval_0_add",
    "language": "go",
    "prompt": 'package add_test\n\nimport (\n    "testing"\n)\n\nfunc add(a int, b int) int {\n',
    "tests": '}\n\nfunc TestAdd(t *testing.T) {\n    if add(2, 3) != 5 {\n        t.Fatal("wrong")\n    }\n}\n',
    "stop_tokens": ["\nfunc", "\n}"],
}
ADD_CPP_MULTIPLE = {
    "name": "HumanEval_0_add",
    "language": "cpp",
    "prompt": "#include<assert.h>\nlong add(long a, long b) {\n",
    "tests": "}\nint main() {\n    auto candidate = add;\n    assert(candidate(2, 3) == 5);\n}\n",
    "stop_tokens": ["\n}"],
}

# (record, right completion, wrong completion, toolchain); each completion runs on past where it must be cut.
CASES = {
    "humaneval-x-cpp": (
        ADD_CPP,
        "    return a + b;\n}\nint unused(",
        "    return a - b;\n}\nint unused(",
        "g++",
    ),
    "humaneval-x-java": (
        ADD_JAVA,
        "        return a + b;\n    }\n}\nclass Other {",
        "        return a * b;\n    }\n}\n",
        "javac",
    ),
    "humaneval-x-js": (ADD_JS, "  return a + b;\n}\nconst x = (", "  return a - b;\n}\n", "node"),
    "multipl-e-cpp": (
        ADD_CPP_MULTIPLE,
        "    return a + b;\n}\n\nint main(",
        "    return a * b;\n}\n",
        "g++",
    ),
    "multipl-e-go": (ADD_GO, "    return a + b\n}\n\nfunc other(", "    return a - b\n}\n", "go"),
}


class Answers:
    """A generator that answers each prompt with the next fixed text, as byte-tokenizer ids."""

    def __init__(self, texts):
        self.texts = list(texts)

    def generate(self, ids, n, temperature, top_p, max_new_tokens, eos_id, pad_id, seed):
        return [list(self.texts.pop(0).encode())]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout_s=60.0, memory_bytes=1024 * 2**20))


def _evaluate(tmp_path, records, answers: "Answers", sandbox, name="out"):
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = EvalSettings("answers", "completion", "hf", 1, 0.0, 0.95, 64, 1, 60.0, 1024, [1])
    summary = evaluate(
        settings,
        load_problems(source),
        ByteTokenizer(),
        answers,
        tmp_path / name,
        sandbox=sandbox,
        progress=False,
    )
    results = [
        json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()
    ]
    return summary, results


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_right_answer_passes_and_a_wrong_one_fails(tmp_path, sandbox, case):
    record, right, wrong, tool = CASES[case]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed on this machine")
    key = "task_id" if "task_id" in record else "name"
    summary, results = _evaluate(
        tmp_path, [record, {**record, key: record[key] + "b"}], Answers([right, wrong]), sandbox
    )
    statuses = [r["samples"][0]["status"] for r in results]
    assert statuses == ["passed", "failed"], [r["samples"][0]["error"] for r in results]
    assert summary["pass_at_k"]["pass@1"] == 0.5


def test_mbpp_problems_run_their_test_list(tmp_path, sandbox):
    record = {
        "task_id": 7,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(2, 3) == 5", "assert add(0, 0) == 0"],
        "test_setup_code": "import math",
    }
    problem = load_problems(_write(tmp_path, [record]))[0]
    assert problem.task_id == "MBPP/7" and "assert add(2, 3) == 5" in problem.prompt
    summary, results = _evaluate(
        tmp_path,
        [record, {**record, "task_id": 8}],
        Answers(
            ["def add(a, b):\n    return a + b\n\nprint(", "def add(a, b):\n    return a - b\n"]
        ),
        sandbox,
    )
    assert [r["samples"][0]["status"] for r in results] == ["passed", "failed"]


def _write(tmp_path, records):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_missing_toolchain_is_named_before_anything_is_generated(tmp_path, monkeypatch, sandbox):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler, no runtime
    fresh = Sandbox(Limits(timeout_s=5.0))
    answers = Answers(["never asked"])
    with pytest.raises(
        MissingToolchain,
        match=r"java problems need javac and java on PATH \(not found: javac, java\); "
        r"install a JDK",
    ):
        _evaluate(tmp_path, [ADD_JAVA], answers, fresh)
    assert answers.texts == ["never asked"]


def test_a_line_in_no_known_format_is_refused_with_its_line_number(tmp_path):
    path = _write(tmp_path, [ADD_CPP, {"question": "?"}])
    with pytest.raises(
        BadProblemFile, match=r"problems.jsonl:2: not a code problem .* MBPP \(task_id, text"
    ):
        load_problems(path)
