"""Every command the README and the guides show is run here on the CPU, or named as one that cannot run on
a CPU, with the reason.

The commands run as written, from a folder that links the repository's examples/, tools/ and benchmarks/,
with three kinds of change: what RUN_HERE appends (a training run stops after 2 steps and saves into a
folder of its own; the example preprocessing config gets the embedded corpus' tokenizer), SUBSTITUTIONS
(the CodeLlama tokenizer path becomes the embedded corpus' tokenizer), and the example's input files, made
from the embedded corpus first (PLACEHOLDER_INPUTS).
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
SHORT_RUN = "train.train_steps=2 train.lr_warmup_steps=1 train.log_interval=1"

RUN_HERE = {
    "bash examples/run_cpu_quickstart.sh": f"{SHORT_RUN} checkpoint.save_dir=runs/quickstart_script",
    "examples/data/build_embedded_dataset.sh data/stdlib": "",
    "megamft train --config examples/quickstart.yaml parallel.tensor_model_parallel_size=1": f"{SHORT_RUN} checkpoint.save_dir=runs/tp1",
    "torchrun --nproc-per-node 4 -m megamft train --config examples/quickstart.yaml "
    "parallel.pipeline_model_parallel_size=2": f"{SHORT_RUN} checkpoint.save_dir=runs/tp2pp2",
    "megamft check --config examples/quickstart.yaml --world-size 8": "",
    "megamft-preprocess --task code_completion=data/completion/ --task text_to_code=data/t2c.jsonl.gz "
    "--tokenizer /models/CodeLlama-34b-hf/tokenizer.model --template mftcoder --max-seq-length 4096 "
    "--overlong truncate --decontaminate humaneval --out data/codellama_mft": "",
    "megamft-preprocess --task code_completion=data/completion/ --task text_to_code=data/t2c.jsonl.gz "
    "--tokenizer /models/CodeLlama-34b-hf/tokenizer.model --template mftcoder --max-seq-length 4096 "
    "--overlong truncate --decontaminate humaneval --workers 16 --out data/codellama_mft": "",
    "megamft-preprocess --config examples/data/preprocess.yaml": "--tokenizer data/stdlib/tokenizer.model",
    # docs/guides/alignment.md's workflow, in order (each uses the one before's output)
    "torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart.yaml": SHORT_RUN,
    # the README's resume command: the same run again, one step further (runs/quickstart, just above)
    "torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart.yaml train.train_steps=160": "train.train_steps=3 train.lr_warmup_steps=1 train.log_interval=1",
    "python examples/data/synthetic_preferences.py runs/pairs.jsonl --pairs 200": "",
    "megamft-preprocess --task sort=runs/pairs.jsonl --out runs/dpo_data --max-seq-length 129 --overlong drop": "",
    "python -m megamft reference --config examples/dpo.yaml checkpoint.load_dir=runs/quickstart": "",
    "python -m megamft train --config examples/dpo.yaml checkpoint.load_dir=runs/quickstart": SHORT_RUN,
    "megamft-convert megatron-to-hf --checkpoint runs/dpo --out release/dpo-model": "",
    "megamft eval humaneval release/dpo-model --tokenizer byte --prompt-format completion --output he/ --n 1 --temperature 0 --k 1": "--limit 2",
    "bash examples/run_cpu_eval_quickstart.sh": f"{SHORT_RUN} eval.interval=2 eval.max_new_tokens=8 checkpoint.save_interval=2 "
    "checkpoint.save_dir=runs/eval_quickstart",
}
"""Commands run by test_documented_command_runs, with what is appended to each."""

NOT_ON_A_CPU = {
    "pip install": "installation: .ci/run installs the test extras into a fresh environment; the GPU extras "
    "and Transformer Engine need a CUDA machine",
    "python -m pytest tests": "the test command itself: .ci/run runs it",
    "megamft-convert hf-to-megatron --hf /models/CodeLlama-34b-hf": "needs the 34B checkpoint "
    "(tests/test_hf_conversion.py converts tiny models)",
    "torchrun --nproc-per-node 8 -m megamft train --config my_run.yaml": "needs 8 GPUs and the 34B checkpoint",
    "megamft-convert megatron-to-hf --checkpoint runs/my_run": "needs the 34B run's checkpoint",
    "megamft eval humaneval release/my-model": "needs the 34B release (the alignment guide's workflow evaluates "
    "a tiny one)",
    "megamft build-kernels": "builds CUDA kernels: needs a CUDA build of torch",
    "git clone https://github.com/NVIDIA/apex": "apex: a CUDA build, on GPU machines",
    "cd apex": "apex: a CUDA build, on GPU machines",
    "bash benchmarks/prepare_wheelhouse.sh": "downloads wheels for the GPU check",
    "bash benchmarks/gpu_check.sh .wheelhouse": "the GPU check: needs a GPU",
}
"""Command prefixes that cannot run on a CPU machine, and why."""

RUN_BY = {
    "bash benchmarks/gpu_check.sh --dry-run": "tests/test_gpu_check.py",
    "torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart_indexed.yaml": "examples/run_cpu_quickstart.sh",
}
"""Commands run as written by another test, or by a script RUN_HERE runs (checked: that file holds the
command's arguments)."""

SUBSTITUTIONS = {"/models/CodeLlama-34b-hf/tokenizer.model": "data/stdlib/tokenizer.model"}
PLACEHOLDER_INPUTS = {  # example input -> the embedded corpus' task it is made from
    "data/completion/part0.jsonl": "code_completion",
    "data/t2c.jsonl.gz": "text_to_code",
    "data/my_tasks/completion/part0.jsonl": "code_completion",
    "data/my_tasks/t2c.jsonl.gz": "text_to_code",
    "data/my_tasks/tests_a.jsonl": "code_to_docstring",
    "data/my_tasks/tests_b.jsonl": "code_to_docstring",
}
SAMPLES_PER_INPUT = 200


def documented_commands() -> dict[str, list[str]]:
    """Each command of the docs' bash blocks (continuations joined, comments and `&&` chains split),
    with the files that show it."""
    found: dict[str, list[str]] = {}
    for page in DOCS:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", "", block).splitlines():
                command = re.split(r"\s#", line.strip(), maxsplit=1)[0].strip()
                for part in filter(None, (p.strip() for p in command.split("&&"))):
                    if not part.startswith("#"):
                        found.setdefault(re.sub(r"\s+", " ", part), []).append(page.name)
    return found


def _not_on_a_cpu(command: str) -> str | None:
    return next((why for prefix, why in NOT_ON_A_CPU.items() if command.startswith(prefix)), None)


def test_every_documented_command_is_run_here_or_said_why_not():
    unclassified = [
        f"{command}  ({', '.join(sorted(set(pages)))})"
        for command, pages in documented_commands().items()
        if command not in RUN_HERE and command not in RUN_BY and _not_on_a_cpu(command) is None
    ]
    assert not unclassified, (
        "add these commands to RUN_HERE (run on the CPU) or NOT_ON_A_CPU (with why):\n"
        + "\n".join(unclassified)
    )


def test_commands_run_by_other_tests_are_there():
    for command, runner in RUN_BY.items():
        program, *args = shlex.split(command)[1:]
        text = (ROOT / runner).read_text()
        assert Path(program).name in text and all(arg in text for arg in args), (command, runner)
        assert runner.startswith("tests/") or f"bash {runner}" in RUN_HERE, runner


def test_the_extraction_finds_the_readme_commands():
    """The extractor itself: the README's train command, with its continuation line joined."""
    commands = documented_commands()
    assert "megamft check --config examples/quickstart.yaml --world-size 8" in commands
    assert (
        "torchrun --nproc-per-node 4 -m megamft train --config examples/quickstart.yaml "
        "parallel.pipeline_model_parallel_size=2"
    ) in commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder like the repository root, with the embedded corpus built (by the documented command)
    and the example inputs made from it."""
    folder = tmp_path_factory.mktemp("docs_commands")
    for name in ("examples", "tools", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)
    _run("examples/data/build_embedded_dataset.sh data/stdlib", folder)
    for path, task in PLACEHOLDER_INPUTS.items():
        lines = (
            (folder / "data" / "stdlib" / "jsonl" / f"{task}.jsonl")
            .read_text()
            .splitlines(keepends=True)
        )
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(lines[:SAMPLES_PER_INPUT])
        target.write_bytes(gzip.compress(text.encode()) if path.endswith(".gz") else text.encode())
    return folder


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    for placeholder, local in SUBSTITUTIONS.items():
        command = command.replace(placeholder, local)
    argv = shlex.split(command)
    if argv[0].startswith("megamft"):  # the console scripts, as python -m (the same entry points)
        module = {
            "megamft": "megamft",
            "megamft-preprocess": "megamft.data.preprocess_cli",
            "megamft-convert": "megamft.checkpoint.convert_cli",
        }[argv[0]]
        argv = [sys.executable, "-m", module, *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif argv[0].endswith(".sh"):
        argv = ["bash", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [c for c in RUN_HERE if not c.startswith("examples/data/build_embedded")]
)
def test_documented_command_runs(command, workdir):
    assert command in documented_commands(), (
        "a command in RUN_HERE that no page shows any more: remove it"
    )
    _run(f"{command} {RUN_HERE[command]}".strip(), workdir)
