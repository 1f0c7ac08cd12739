"""HumanEval evaluation: problems, sandbox, pass@k, prompts as trained, resume."""

import json
import math
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megamft.data.preprocess import PreprocessOptions, preprocess
from megamft.data.tokenizer import load_tokenizer
from megamft.eval import EvaluationError
from megamft.eval.humaneval import (
    RESULTS,
    EvalSettings,
    check_problems,
    default_ks,
    evaluate,
    read_done,
)
from megamft.eval.passk import pass_at_k
from megamft.eval.problems import load_problems
from megamft.eval.prompts import PromptBuilder
from megamft.eval.sandbox import Limits, Sandbox

PROBLEMS = load_problems()


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout_s=5.0, memory_bytes=1024 * 2**20))


def test_all_164_problems_load():
    assert len(PROBLEMS) == 164 and len({p.task_id for p in PROBLEMS}) == 164
    assert PROBLEMS[0].task_id == "HumanEval/0" and PROBLEMS[-1].task_id == "HumanEval/163"


def test_canonical_solutions_pass_every_problem(sandbox):
    outcomes = check_problems(sandbox, [(p, p.canonical_solution) for p in PROBLEMS], workers=8)
    failed = [
        (p.task_id, o.status, o.stderr_tail[-200:])
        for p, o in zip(PROBLEMS, outcomes)
        if o.status != "passed"
    ]
    assert failed == []


def test_a_wrong_solution_fails_every_problem(sandbox):
    outcomes = check_problems(sandbox, [(p, "    return None\n") for p in PROBLEMS[:24]], workers=8)
    assert [o.status for o in outcomes] == ["failed"] * 24


def test_an_infinite_loop_is_killed_at_the_time_limit():
    limits = Limits(timeout_s=2.0)
    outcome = Sandbox(limits).run("while True:\n    pass\n")
    assert (
        outcome.status == "timeout" and limits.timeout_s <= outcome.seconds < limits.timeout_s + 2
    )


def test_a_memory_bomb_stops_at_the_memory_limit():
    outcome = Sandbox(Limits(timeout_s=20.0, memory_bytes=512 * 2**20)).run(
        "hoard = []\nwhile True:\n    hoard.append(bytearray(50 * 2**20))\n"
    )
    assert (
        outcome.status == "failed" and "MemoryError" in outcome.stderr_tail and outcome.seconds < 20
    )


def test_a_program_may_write_in_its_folder_and_use_tempfile(sandbox):
    program = (
        "import os, tempfile\n"
        "open('notes.txt', 'w').write('kept')\n"
        "assert open(os.path.join(os.getcwd(), 'notes.txt')).read() == 'kept'\n"
        "with tempfile.NamedTemporaryFile('w+') as f:\n    f.write('x'); f.flush(); f.seek(0)\n"
        "    assert f.read() == 'x'\n"
        "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'a'), 'w').write('y')\n"
    )
    outcome = sandbox.run(program)
    assert outcome.status == "passed", outcome.stderr_tail


def test_limits_too_small_to_start_python_are_refused_with_the_limit_named():
    with pytest.raises(
        EvaluationError,
        match=r"does not start within the sandbox's limits \(--memory-mb 8, "
        r"--timeout 10\): raise them",
    ):
        Sandbox(Limits(memory_bytes=8 * 2**20))


@pytest.mark.parametrize(
    "n, ks, named",
    [
        (
            1,
            [1, 10],
            r"--k 1 10: pass@k needs 1 <= k <= n \(--n 1\); sample at "
            r"least 10",
        ),
        (5, [0], r"--k 0: pass@k needs 1 <= k <= n"),
    ],
)
def test_a_k_larger_than_n_is_refused(n, ks, named):
    settings = EvalSettings(
        "model", "completion", "hf", n, 0.8 if n > 1 else 0.0, 0.95, 4, 7, 5.0, 1024, ks
    )
    with pytest.raises(EvaluationError, match=named):
        settings.check()


def test_the_default_ks_are_those_n_samples_measure():
    assert [default_ks(n) for n in (1, 9, 10, 200)] == [[1], [1], [1, 10], [1, 10, 100]]


def test_nothing_is_left_behind(sandbox, tmp_path):
    """Writes outside the working directory fail; a daemonized child does not outlive the program."""
    if not sandbox.namespaces:
        pytest.skip(
            "namespaces unavailable here (needs root and util-linux unshare/setpriv): only the basic "
            "sandbox runs, which does not stop these"
        )
    marker = f"megamft-escape-{uuid.uuid4().hex}"
    tmp_path.chmod(0o777)  # even a folder anyone may write to stays untouched
    targets = [Path("/tmp") / marker, Path("/var/tmp") / marker, tmp_path / marker]
    sleep_seconds = f"{1000 + uuid.uuid4().int % 1000}.5"
    program = "import os, subprocess\n"
    program += "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets
    )
    program += "try:\n    open('../' + {!r}, 'w').write('x')\nexcept OSError:\n    pass\n".format(
        marker
    )
    program += (
        f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', {sleep_seconds!r}])\n    os._exit(0)\n"
    )
    outcome = sandbox.run(program)
    assert outcome.status == "passed", outcome.stderr_tail
    time.sleep(0.5)
    assert [t for t in targets if t.exists()] == []
    assert not list(Path(tempfile_root()).glob(marker))
    lingering = subprocess.run(
        ["pgrep", "-f", f"sleep {sleep_seconds}"], capture_output=True, text=True
    ).stdout
    assert lingering == ""


def tempfile_root() -> str:
    import tempfile

    return tempfile.gettempdir()


@pytest.mark.parametrize(
    "n,c,k",
    [
        (1, 0, 1),
        (1, 1, 1),
        (10, 3, 1),
        (10, 3, 5),
        (10, 8, 3),
        (200, 13, 10),
        (200, 13, 100),
        (200, 0, 100),
        (5, 5, 5),
        (20, 1, 20),
    ],
)
def test_pass_at_k_equals_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(
        1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12, abs=1e-15
    )


def _make_tokenizer(folder: Path) -> Path:
    """A Llama-like BPE: sentencepiece-style prefix space, BOS added in front, <s>/</s>/<pad> specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    tokenizer.train_from_iterator([p.prompt + p.canonical_solution for p in PROBLEMS], trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return _make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("template", ["mftcoder", "chatml", "llama2"])
def test_chat_prompt_is_what_training_saw_before_each_answer(tmp_path, tokenizer_folder, template):
    """megamft-preprocess of the problem as a one-turn record: every token before the answer."""
    problems = PROBLEMS[:12]
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": p.canonical_solution},
                ]
            }
        )
        for p in problems
    ]
    source = tmp_path / "he.jsonl"
    source.write_text("\n".join(lines) + "\n")
    spec = str(tokenizer_folder / "tokenizer.json")
    preprocess(
        PreprocessOptions(
            tasks={"he": [str(source)]},
            out_dir=str(tmp_path / "out"),
            tokenizer=spec,
            template=template,
            progress=False,
            dedup=False,
            max_seq_length=4096,
        )
    )
    tokens, masks = (
        IndexedDataset(str(tmp_path / "out" / "he")),
        IndexedDataset(str(tmp_path / "out" / "he_loss_mask")),
    )
    builder = PromptBuilder(load_tokenizer(spec), "chat", template)
    for doc, problem in enumerate(problems):
        ids, mask = tokens[doc].tolist(), masks[doc].tolist()
        assert builder.ids(problem.prompt) == ids[: mask.index(1)]


def test_completion_prompt_is_the_tokenizers_encoding(tokenizer_folder):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    builder = PromptBuilder(load_tokenizer(str(tokenizer_folder / "tokenizer.json")), "completion")
    for problem in PROBLEMS:
        assert builder.ids(problem.prompt) == reference(problem.prompt)["input_ids"]


@pytest.fixture(scope="module")
def tiny_model(tokenizer_folder, tmp_path_factory):
    """A random-weight Llama saved with the test tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    tok = load_tokenizer(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


class _StopAfter:
    """Wraps a generator; raises once `limit` problems were generated (an interruption)."""

    def __init__(self, inner, limit=None):
        self.inner, self.limit, self.calls = inner, limit, 0

    def generate(self, *args, **kwargs):
        if self.limit is not None and self.calls >= self.limit:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        return self.inner.generate(*args, **kwargs)


def _without_timings(records):
    return [
        {**r, "samples": [{k: v for k, v in s.items() if k != "seconds"} for s in r["samples"]]}
        for r in records
    ]


@pytest.mark.parametrize(
    "prompt_format,n,temperature", [("completion", 1, 0.0), ("completion", 3, 0.8)]
)
def test_an_interrupted_evaluation_resumes_to_the_same_results(
    tmp_path, tiny_model, sandbox, prompt_format, n, temperature
):
    from megamft.eval.generation import TransformersGenerator

    problems = PROBLEMS[:4]
    tokenizer = load_tokenizer(str(tiny_model / "tokenizer.json"))
    settings = EvalSettings(
        str(tiny_model),
        prompt_format,
        "hf",
        n,
        temperature,
        0.95,
        12,
        7,
        5.0,
        1024,
        [1, 2] if n > 1 else [1],
    )
    generator = TransformersGenerator(tiny_model, device="cpu")
    whole = evaluate(
        settings,
        problems,
        tokenizer,
        _StopAfter(generator),
        tmp_path / "whole",
        workers=2,
        sandbox=sandbox,
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            settings,
            problems,
            tokenizer,
            _StopAfter(generator, limit=2),
            tmp_path / "split",
            workers=2,
            sandbox=sandbox,
            progress=False,
        )
    with open(tmp_path / "split" / RESULTS, "a") as f:
        f.write('{"task_id": "HumanEval/2", "n": ')  # a line cut short by a kill mid-write
    rest = _StopAfter(generator)
    resumed = evaluate(
        settings,
        problems,
        tokenizer,
        rest,
        tmp_path / "split",
        workers=2,
        sandbox=sandbox,
        progress=False,
    )
    assert rest.calls == 2  # only the problems not done were generated again

    def read(folder):
        return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]

    assert _without_timings(read(tmp_path / "split")) == _without_timings(read(tmp_path / "whole"))
    assert resumed["pass_at_k"] == whole["pass_at_k"] and set(whole["pass_at_k"]) == {
        "pass@1",
        "pass@2",
    } - ({"pass@2"} if n < 2 else set())
    assert len(read_done(tmp_path / "split" / RESULTS)) == 4


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_model, sandbox):
    tokenizer = load_tokenizer(str(tiny_model / "tokenizer.json"))
    settings = EvalSettings(str(tiny_model), "completion", "hf", 1, 0.0, 0.95, 4, 7, 5.0, 1024, [1])

    class Empty:
        def generate(self, *args, **kwargs):
            return [[]]

    evaluate(settings, PROBLEMS[:1], tokenizer, Empty(), tmp_path, sandbox=sandbox, progress=False)
    settings.max_new_tokens = 8
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(
            settings, PROBLEMS[:1], tokenizer, Empty(), tmp_path, sandbox=sandbox, progress=False
        )


def test_the_megamft_command_evaluates_a_model_folder(tmp_path, tiny_model):
    from megamft.cli import main

    assert (
        main(
            [
                "eval",
                "humaneval",
                str(tiny_model),
                "--output",
                str(tmp_path),
                "--prompt-format",
                "completion",
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--k",
                "1",
                "--backend",
                "transformers",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["problems"] == 2 and "pass@1" in summary["pass_at_k"] and summary["sandbox"]


def test_a_megamft_checkpoint_evaluates_as_its_hugging_face_original(tmp_path, tiny_model):
    """`megamft eval humaneval CHECKPOINT` exports the checkpoint (tokenizer included) and evaluates the export:
    greedy completions and pass@1 equal those of the Hugging Face folder the checkpoint was converted from."""
    from megamft.checkpoint.hf_convert import hf_to_megatron
    from megamft.cli import main

    checkpoint = hf_to_megatron(tiny_model, tmp_path / "ckpt")
    scratch_before = set(Path(tempfile.gettempdir()).glob("megamft-eval-*"))
    args = [
        "--prompt-format",
        "completion",
        "--limit",
        "3",
        "--max-new-tokens",
        "12",
        "--k",
        "1",
        "--backend",
        "transformers",
    ]
    for model, out in ((tiny_model, "from_hf"), (checkpoint, "from_checkpoint")):
        assert main(["eval", "humaneval", str(model), "--output", str(tmp_path / out), *args]) == 0
    results = {
        out: [
            {"task_id": r["task_id"], "completions": [s["completion"] for s in r["samples"]]}
            for r in map(json.loads, (tmp_path / out / RESULTS).read_text().splitlines())
        ]
        for out in ("from_hf", "from_checkpoint")
    }
    assert len(results["from_hf"]) == 3 and any(
        c for r in results["from_hf"] for c in r["completions"]
    )
    assert results["from_checkpoint"] == results["from_hf"]
    summaries = [
        json.loads((tmp_path / out / "summary.json").read_text())
        for out in ("from_hf", "from_checkpoint")
    ]
    assert summaries[0]["pass_at_k"] == summaries[1]["pass_at_k"]
    assert (
        set(Path(tempfile.gettempdir()).glob("megamft-eval-*")) == scratch_before
    )  # the export is gone


# ---- the results are of one model: identified by content, not by path --------------------------------------


def _eval(model: Path, output: Path):
    from megamft.cli import main

    return main(
        [
            "eval",
            "humaneval",
            str(model),
            "--output",
            str(output),
            "--prompt-format",
            "completion",
            "--limit",
            "1",
            "--max-new-tokens",
            "4",
            "--k",
            "1",
            "--backend",
            "transformers",
        ]
    )


def test_rerunning_an_evaluation_on_another_model_at_the_same_path_is_refused(
    tmp_path, tiny_model, capsys
):
    """A model folder replaced by another model (a re-export, a save folder whose `latest` moved on)."""
    import shutil

    from transformers import LlamaForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert _eval(model, tmp_path / "out") == 0
    results = (tmp_path / "out" / RESULTS).read_bytes()
    torch.manual_seed(1)  # other weights, same architecture, same files
    other = LlamaForCausalLM(LlamaForCausalLM.config_class.from_pretrained(model))
    other.save_pretrained(str(model))
    capsys.readouterr()
    assert _eval(model, tmp_path / "out") == 2
    assert re.search(
        r"^megamft: .*holds the results of another model .*: the model differs \(model\.safetensors\)",
        capsys.readouterr().err,
        re.M,
    )
    assert (tmp_path / "out" / RESULTS).read_bytes() == results


def test_rerunning_an_evaluation_with_other_tokenizer_files_is_refused(
    tmp_path, tiny_model, capsys
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert _eval(model, tmp_path / "out") == 0
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<pad>"}))
    capsys.readouterr()
    assert _eval(model, tmp_path / "out") == 2
    assert "the tokenizer differs (tokenizer_config.json)" in capsys.readouterr().err


def test_the_same_model_under_another_path_resumes_its_evaluation(tmp_path, tiny_model):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert _eval(model, tmp_path / "out") == 0
    results = (tmp_path / "out" / RESULTS).read_bytes()
    moved = tmp_path / "moved"
    shutil.move(model, moved)
    assert _eval(moved, tmp_path / "out") == 0
    assert (
        tmp_path / "out" / RESULTS
    ).read_bytes() == results  # nothing generated again, nothing mixed in
