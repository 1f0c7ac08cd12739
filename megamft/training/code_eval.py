"""Code-execution benchmarks inside training (the `eval` section): pass@k at the training layout.

Each evaluation generates completions in the training processes, with the model as it is sharded
for training (TP/PP/VPP/EP: megamft.model.generate, megatron's static KV cache). Problem i of a
benchmark goes to data-parallel replica i mod DP; the replica's last pipeline stage, tensor rank 0,
runs its completions in the sandbox (megamft.eval.sandbox), so programs run on every replica at
once. Outcomes are gathered on every rank (model selection needs the same scores everywhere).

Prompts are built exactly as `megamft eval humaneval` builds them (megamft.eval.prompts: the
training template and encoder), completions are cut and assembled the same way, and greedy
decoding takes the same tokens as the exported model's (tested), so the numbers match the
stand-alone evaluation of the checkpoint. Each evaluation's completions and outcomes are written
to <save_dir>/eval/step_XXXXXXX/<benchmark>.jsonl (results.jsonl's format) with a summary.json.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megamft.config import ConfigError, MegamftConfig
from megamft.config.loading import PACKAGED_HUMANEVAL
from megamft.data.decontaminate import not_decontaminated
from megamft.data.tokenizer import load_tokenizer
from megamft.eval.completions import code_from_answer, truncate_completion
from megamft.eval.humaneval import run_completions
from megamft.eval.languages import find_tools, language
from megamft.eval.passk import mean_pass_at_k
from megamft.eval.problems import Problem, load_problems
from megamft.eval.prompts import PromptBuilder
from megamft.eval.sandbox import Limits, Sandbox
from megamft.model.generate import Sampling, generate, generating
from megamft.platform import distributed

log = logging.getLogger("megamft")


def eval_tokenizer_spec(cfg: MegamftConfig, manifest: dict | None) -> str:
    """eval.tokenizer, else the training data's (data.tokenizer; preprocessed data records no path)."""
    if cfg.eval.tokenizer:
        return cfg.eval.tokenizer
    if cfg.data.source == "stdlib":
        return cfg.data.tokenizer
    raise ConfigError(
        "eval.problems with data.source=indexed needs eval.tokenizer: the tokenizer data.path was "
        "preprocessed with (its manifest records the tokenizer's checksum, not its path)"
    )


def eval_template(cfg: MegamftConfig, manifest: dict | None) -> str:
    """eval.template, else the template the training data was rendered with."""
    if cfg.eval.template:
        return cfg.eval.template
    if manifest is not None:
        return (manifest.get("template") or {}).get("name", "mftcoder")
    return cfg.data.template


def _check_same_tokenizer(tokenizer, manifest: dict | None, spec: str) -> None:
    trained = (manifest or {}).get("tokenizer", {})
    now = tokenizer.identity()
    if "sha256" in trained and trained.get("sha256") != now.get("sha256"):
        raise ConfigError(
            f"eval.tokenizer={spec} is not the tokenizer data.path was preprocessed with "
            f"({trained.get('file')}, sha256 {trained['sha256'][:12]}...); give that one"
        )


def _warn_if_not_decontaminated(problems: dict[str, str], manifest: dict | None) -> None:
    """pass@k of a benchmark the training data may contain overstates what the model learned: say so, once."""
    if manifest is None or not distributed.is_logging_rank():
        return
    missing = not_decontaminated(problems, manifest)
    if missing:
        log.warning(
            "eval.problems %s: the training data was not decontaminated against %s (its manifest names "
            "the benchmark files it was checked against); pass@k may count memorised problems. Run "
            "megamft-preprocess with --decontaminate-eval <this config> to drop samples that copy them",
            ", ".join(missing),
            "this file" if len(missing) == 1 else "these files",
        )


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    prompts: list[list[int]]


class CodeEvaluator:
    """pass@k of every eval.problems benchmark at a step; built once per run (see the module docstring)."""

    def __init__(self, cfg: MegamftConfig, manifest: dict | None, out_dir: Path | None):
        e = cfg.eval
        spec = eval_tokenizer_spec(cfg, manifest)
        self.cfg, self.out_dir, self.last_step = e, out_dir, None
        self.tokenizer = load_tokenizer(spec)
        _check_same_tokenizer(self.tokenizer, manifest, spec)
        builder = PromptBuilder(self.tokenizer, e.prompt_format, eval_template(cfg, manifest))
        self.benchmarks = []
        for name, path in e.problems.items():
            problems = load_problems(None if path == PACKAGED_HUMANEVAL else path)[: e.limit]
            for lang in sorted({p.language for p in problems}):
                find_tools(language(lang), f"eval.problems.{name}")
            self.benchmarks.append(
                Benchmark(name, problems, [builder.ids(p.prompt) for p in problems])
            )
        _warn_if_not_decontaminated(e.problems, manifest)
        self.sampling = Sampling(e.temperature, e.top_p, self.tokenizer.vocab_size)
        self.sandbox = (
            Sandbox(Limits(e.timeout_s, e.memory_mb * 2**20)) if _runs_programs() else None
        )

    @classmethod
    def for_run(cls, cfg: MegamftConfig, manifest: dict | None) -> "CodeEvaluator | None":
        if not cfg.eval.problems:
            return None
        out = Path(cfg.checkpoint.save_dir) / "eval" if cfg.checkpoint.save_dir else None
        return cls(cfg, manifest, out)

    def due(self, step: int, final: bool = False) -> bool:
        return step != self.last_step and (
            final or bool(self.cfg.interval and step % self.cfg.interval == 0)
        )

    def run(self, chunks, step: int) -> dict[str, float]:
        """Evaluate every benchmark now: {"eval/<name>/pass@<k>": value}, the same on every rank."""
        self.last_step = step
        scores = {}
        for benchmark in self.benchmarks:
            started = time.perf_counter()
            records = self._evaluate(chunks, benchmark)
            scores.update(self._report(benchmark, records, step, time.perf_counter() - started))
        return scores

    def _evaluate(self, chunks, benchmark: Benchmark) -> list[dict]:
        """This replica's problems generated and run; every replica's records, in problem order."""
        dp_rank, dp_size = (
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )
        mine = list(range(dp_rank, len(benchmark.problems), dp_size))
        calls = -(
            -len(benchmark.problems) // dp_size
        )  # the same number on every replica (lockstep)
        lockstep = parallel_state.get_data_parallel_group_gloo()
        e, samples = self.cfg, []
        with generating(chunks) as models:
            for call in range(calls):
                index = mine[call] if call < len(mine) else None
                prompt = benchmark.prompts[index] if index is not None else None
                samples.append(
                    generate(
                        models,
                        prompt,
                        e.n,
                        e.max_new_tokens,
                        self.tokenizer.eos_id,
                        self.sampling,
                        e.seed + (index or 0),
                        lockstep,
                    )
                )
        local = (
            [
                self._solve(benchmark.problems[i], benchmark.prompts[i], s)
                for i, s in zip(mine, samples)
            ]
            if self.sandbox is not None
            else []
        )
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local, group=distributed.host_group())
        order = {p.task_id: i for i, p in enumerate(benchmark.problems)}
        return sorted((r for part in gathered for r in part), key=lambda r: order[r["task_id"]])

    def _solve(self, problem: Problem, prompt: list[int], samples: list[list[int]]) -> dict:
        texts = [self.tokenizer.decode(s) for s in samples]
        completions = [
            truncate_completion(t, problem.stop, problem.stop_kept)
            if self.cfg.prompt_format == "completion"
            else code_from_answer(t)
            for t in texts
        ]
        outcomes = run_completions(self.sandbox, problem, completions, self.cfg.workers)
        return {
            "task_id": problem.task_id,
            "prompt_tokens": len(prompt),
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

    def _report(
        self, benchmark: Benchmark, records: list[dict], step: int, seconds: float
    ) -> dict[str, float]:
        counts = [(r["n"], r["correct"]) for r in records]
        scores = {
            f"eval/{benchmark.name}/pass@{k}": mean_pass_at_k(counts, k)
            for k in sorted(set(self.cfg.k))
        }
        if distributed.is_logging_rank():
            log.info(
                "step %d eval %s: %s (%d problems, %.1f s)",
                step,
                benchmark.name,
                " ".join(f"{name.rsplit('/', 1)[1]} {value:.3f}" for name, value in scores.items()),
                len(records),
                seconds,
            )
            self._write(benchmark.name, records, scores, step)
        return scores

    def _write(self, name: str, records: list[dict], scores: dict, step: int) -> None:
        if self.out_dir is None:
            return
        folder = self.out_dir / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {
            "benchmark": name,
            "step": step,
            "problems": len(records),
            "pass_at_k": scores,
            "sandbox": self.sandbox.isolation if self.sandbox else None,
        }
        (folder / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))


def _runs_programs() -> bool:
    """The rank of each replica that runs its completions: last pipeline stage, tensor rank 0."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
