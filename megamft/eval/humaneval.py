"""HumanEval pass@k: prompts -> completions -> sandboxed tests -> results.jsonl and summary.json.

results.jsonl holds one line per finished problem, appended and fsynced as each one
finishes; a rerun with the same settings skips the problems it holds (a half-written last
line, from a kill mid-write, is cut off) and generates only the rest. settings.json records
the settings and the model's and tokenizer's identity (eval/identity.py): a rerun with other
settings or another model is refused, the same model under another path resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megamft.eval import EvaluationError
from megamft.eval.completions import code_from_answer, truncate_completion
from megamft.eval.identity import identity_differences
from megamft.eval.passk import mean_pass_at_k
from megamft.eval.problems import Problem
from megamft.eval.prompts import PromptBuilder
from megamft.eval.sandbox import Limits, Sandbox
from megamft.platform.kill_points import kill_point

RESULTS, SUMMARY, SETTINGS = "results.jsonl", "summary.json", "settings.json"
log = logging.getLogger("megamft")


@dataclass
class EvalSettings:
    """What decides the results; a resumed evaluation must use the same."""

    model: str
    prompt_format: str = "chat"  # chat | completion
    template: str = "hf"  # chat: mftcoder | chatml | llama2 | hf (the tokenizer's chat template)
    n: int = 1  # samples per problem
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 1234
    timeout_s: float = 10.0
    memory_mb: int = 2048
    ks: list[int] = field(default_factory=lambda: [1, 10, 100])

    def check(self) -> None:
        if self.n < 1:
            raise EvaluationError("--n must be >= 1")
        if self.temperature == 0 and self.n > 1:
            raise EvaluationError(
                "greedy decoding (--temperature 0) gives n identical samples: use --n 1, "
                "or sample with --temperature > 0"
            )
        too_large = [k for k in self.ks if k > self.n]
        if too_large or any(k < 1 for k in self.ks):
            raise EvaluationError(
                f"--k {' '.join(map(str, self.ks))}: pass@k needs 1 <= k <= n (--n {self.n}); "
                f"sample at least {max(too_large or [1])} completions per problem (--n, with "
                "--temperature > 0), or leave the larger k out"
            )


def default_ks(n: int) -> list[int]:
    """The pass@k reported when none is asked for: those of 1, 10 and 100 that n samples can measure."""
    return [k for k in (1, 10, 100) if k <= n]


def completion_text(settings: EvalSettings, problem: Problem, generated: str) -> str:
    """The code put after the prompt for one generated text."""
    if settings.prompt_format == "completion":
        return truncate_completion(generated, problem.stop, problem.stop_kept)
    return code_from_answer(generated)


def run_completions(
    sandbox: Sandbox, problem: Problem, completions: list[str], workers: int
) -> list:
    return _run_programs(
        sandbox, [(problem.program(c), problem.language) for c in completions], workers
    )


def check_problems(sandbox: Sandbox, pairs: list[tuple[Problem, str]], workers: int) -> list:
    """Outcomes of (problem, completion) pairs, run `workers` at a time."""
    return _run_programs(
        sandbox, [(problem.program(c), problem.language) for problem, c in pairs], workers
    )


def _run_programs(sandbox: Sandbox, jobs: list[tuple[str, str]], workers: int) -> list:
    """Outcomes of (program, language) jobs, `workers` at a time. Interrupted (Ctrl-C) or failed, it ends the
    programs running and drops those queued before it lets the error through: a pool's own exit would
    first run every queued program to its end."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        return list(pool.map(lambda job: sandbox.run(*job), jobs))
    except BaseException:
        with sandbox.refusing_new():
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def read_done(path: Path) -> dict[str, dict]:
    """Finished problems of a results file; a last line without its newline is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EvaluationError(
                f"{path}:{number}: not a JSON line; move the file away to start over"
            ) from None
        done[record["task_id"]] = record
    return done


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class OtherEvaluation(EvaluationError):
    """An --output folder holding the results of another evaluation (other settings or another model)."""


def _claim_settings(out_dir: Path, settings: EvalSettings, identity: dict | None) -> None:
    """Record what decides the results, or refuse to add to results decided otherwise.

    With identities on both sides the model is compared by content, not by path (settings.model).
    """
    path = out_dir / SETTINGS
    wanted = asdict(settings)
    results = out_dir / RESULTS
    if (
        not path.exists() or not results.exists() or not results.stat().st_size
    ):  # no result binds it yet
        _write_atomic(
            path, json.dumps({**wanted, "identity": identity} if identity else wanted, indent=2)
        )
        return
    saved = json.loads(path.read_text())
    by_content = identity is not None and isinstance(saved.get("identity"), dict)
    changed = sorted(
        k for k in wanted if saved.get(k) != wanted[k] and not (by_content and k == "model")
    )
    if changed:
        raise OtherEvaluation(
            f"{out_dir} holds an evaluation with other settings ({', '.join(changed)}); "
            "use the same settings to resume, or another --output folder"
        )
    differences = identity_differences(saved["identity"], identity) if by_content else []
    if differences:
        raise OtherEvaluation(
            f"{out_dir} holds the results of another model than {settings.model}: "
            f"{'; '.join(differences)}. Evaluate the model those results are of to resume them "
            "(see its settings.json), or give another --output folder"
        )
    if identity is not None and not by_content:
        log.warning(
            "%s: its settings.json records no model identity (written by an older megamft): resuming "
            "it as the same model because the path is the same",
            out_dir,
        )


def claim_output(settings: EvalSettings, out_dir: str | Path, identity: dict | None = None) -> None:
    """Check the settings, create `out_dir` and record them there, or refuse results of another evaluation:
    called before the model is loaded, so a wrong --output costs no model load."""
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_settings(out_dir, settings, identity)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _progress(total: int, done: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        initial=done,
        desc="humaneval",
        unit="problem",
        disable=not enabled,
        dynamic_ncols=True,
    )


def evaluate(
    settings: EvalSettings,
    problems: list[Problem],
    tokenizer,
    generator,
    out_dir: str | Path,
    workers: int = 4,
    sandbox: Sandbox | None = None,
    progress: bool | None = None,
    identity: dict | None = None,
) -> dict:
    """Generate, execute and score every problem not already in `out_dir`; returns the summary.

    identity: {"model": ..., "tokenizer": ...} (eval/identity.py) of what is evaluated; results of
    another model in `out_dir` are then refused whatever its path.
    """
    out_dir = Path(out_dir)
    claim_output(settings, out_dir, identity)
    results = out_dir / RESULTS
    done = read_done(results)
    builder = PromptBuilder(tokenizer, settings.prompt_format, settings.template)
    sandbox = sandbox or Sandbox(Limits(settings.timeout_s, settings.memory_mb * 2**20))
    for name in sorted({p.language for p in problems}):
        sandbox.prepare(name)  # a missing compiler or runtime is named before anything is generated
    bar = _progress(
        len(problems),
        sum(p.task_id in done for p in problems),
        sys.stderr.isatty() if progress is None else progress,
    )
    for index, problem in enumerate(problems):
        if problem.task_id in done:
            continue
        done[problem.task_id] = _solve(
            settings, problem, index, builder, tokenizer, generator, sandbox, workers
        )
        _append(results, done[problem.task_id])
        kill_point("eval.problem", index)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    summary = summarize(settings, [done[p.task_id] for p in problems], sandbox.isolation)
    _write_atomic(out_dir / SUMMARY, json.dumps(summary, indent=2))
    return summary


def _solve(settings, problem, index, builder, tokenizer, generator, sandbox, workers) -> dict:
    ids = builder.ids(problem.prompt)
    samples = generator.generate(
        ids,
        settings.n,
        settings.temperature,
        settings.top_p,
        settings.max_new_tokens,
        tokenizer.eos_id,
        tokenizer.pad_id,
        settings.seed + index,
    )
    completions = [completion_text(settings, problem, tokenizer.decode(s)) for s in samples]
    outcomes = run_completions(sandbox, problem, completions, workers)
    return {
        "task_id": problem.task_id,
        "prompt_tokens": len(ids),
        "n": len(outcomes),
        "correct": sum(o.status == "passed" for o in outcomes),
        "samples": [
            {
                "completion": c,
                "status": o.status,
                "seconds": round(o.seconds, 3),
                "error": o.stderr_tail[-500:] if o.status != "passed" else "",
            }
            for c, o in zip(completions, outcomes)
        ],
    }


def summarize(settings: EvalSettings, records: list[dict], isolation: list[str]) -> dict:
    counts = [(r["n"], r["correct"]) for r in records]
    n = min(c[0] for c in counts)
    return {
        "problems": len(records),
        "samples_per_problem": n,
        "pass_at_k": {f"pass@{k}": mean_pass_at_k(counts, k) for k in settings.ks if k <= n},
        "settings": asdict(settings),
        "sandbox": isolation,
    }
