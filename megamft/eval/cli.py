"""`megamft eval humaneval` (also `python tools/eval_humaneval.py`): argument parsing only."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from megamft.entry_point import ArgumentParser, run_command
from megamft.eval import EvaluationError


def add_humaneval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a Hugging Face model folder, or a megamft checkpoint (save folder, "
        "iteration folder, or <save_dir>/best), exported to a temporary HF folder "
        "first",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder for results.jsonl, summary.json, settings.json "
        "(rerun the same command to resume)",
    )
    parser.add_argument(
        "--prompt-format",
        choices=("chat", "completion"),
        default="chat",
        help="chat: the prompt as a user turn of --template; completion: the raw prompt",
    )
    parser.add_argument(
        "--template",
        default="hf",
        help="chat template: mftcoder, chatml, llama2, or hf "
        "(the tokenizer's chat_template; default)",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder's)"
    )
    parser.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--seed", type=int, default=1234, help="sampling seed (problem i uses seed + i)"
    )
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        help="pass@k to report, each k <= --n (default: those of 1, 10, 100 up to --n)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per program (default 10)"
    )
    parser.add_argument(
        "--memory-mb", type=int, default=2048, help="address-space limit per program"
    )
    parser.add_argument("--workers", type=int, default=4, help="programs run at once")
    parser.add_argument(
        "--backend",
        choices=("auto", "transformers", "vllm"),
        default="auto",
        help="auto: vLLM when installed, else transformers",
    )
    parser.add_argument(
        "--problems", help="a HumanEval-format .jsonl(.gz) instead of HumanEval's 164 problems"
    )
    parser.add_argument("--limit", type=int, help="only the first N problems (a quick check)")


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "metadata.json").exists()


@contextlib.contextmanager
def hf_model_folder(model: str):
    """The model as a Hugging Face folder: itself, or a megamft checkpoint exported for the evaluation."""
    path = Path(model)
    if not path.exists():
        raise EvaluationError(
            f"model {model!r} not found: give a Hugging Face folder or a megamft checkpoint"
        )
    if _is_hf_folder(path):
        yield path
        return
    from megamft.checkpoint.hf_convert import megatron_to_hf

    with tempfile.TemporaryDirectory(prefix="megamft-eval-") as scratch:
        yield megatron_to_hf(path, Path(scratch) / "hf")


def run_humaneval(args: argparse.Namespace) -> int:
    from megamft.data.tokenizer import load_tokenizer
    from megamft.eval.generation import make_generator
    from megamft.eval.humaneval import EvalSettings, claim_output, default_ks, evaluate
    from megamft.eval.identity import model_identity, tokenizer_identity
    from megamft.eval.problems import load_problems

    settings = EvalSettings(
        str(Path(args.model).resolve()),
        args.prompt_format,
        args.template,
        args.n,
        args.temperature,
        args.top_p,
        args.max_new_tokens,
        args.seed,
        args.timeout,
        args.memory_mb,
        sorted(set(args.k)) if args.k else default_ks(args.n),
    )
    try:
        settings.check()
    except ValueError as err:  # its checks of the options, whatever class they raise
        raise EvaluationError(str(err)) from None
    if args.problems and not Path(args.problems).is_file():
        raise EvaluationError(
            f"--problems {args.problems}: no such file; give a HumanEval-format .jsonl(.gz)"
        )
    problems = load_problems(args.problems)[: args.limit]
    Path(args.output).mkdir(
        parents=True, exist_ok=True
    )  # a folder it cannot write: said before the model loads
    with hf_model_folder(args.model) as folder:
        tokenizer_path = Path(args.tokenizer) if args.tokenizer else folder
        if not args.tokenizer and not (folder / "tokenizer.json").exists():
            raise EvaluationError(
                f"{folder} has no tokenizer.json: give the model's tokenizer with --tokenizer"
            )
        tokenizer = load_tokenizer(str(tokenizer_path))
        identity = {"model": model_identity(folder), "tokenizer": tokenizer_identity(tokenizer)}
        claim_output(settings, args.output, identity)  # before the model is loaded for generation
        summary = evaluate(
            settings,
            problems,
            tokenizer,
            make_generator(folder, args.backend),
            args.output,
            workers=args.workers,
            identity=identity,
        )
    print(
        json.dumps(
            {k: summary[k] for k in ("problems", "samples_per_problem", "pass_at_k", "sandbox")},
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        parser = ArgumentParser(prog="eval_humaneval", description="HumanEval pass@k of a model")
        add_humaneval_arguments(parser)
        return run_humaneval(parser.parse_args(argv))

    return run_command("eval_humaneval", body)
