"""The step line's per-task losses: token means over the log interval, and a task with no learned token in
the interval said to be absent, never `nan` (which reads like a divergence)."""

import logging
import math

from megamft.config import load_config
from megamft.platform import distributed
from megamft.training.metrics import TaskLossInterval
from megamft.training.step import StepStats
from megamft.training.steps import log_step


def _stats(losses: dict, tokens: dict) -> StepStats:
    task_loss = {
        t: (losses[t] if tokens[t] else float("nan")) for t in tokens
    }  # as step.reduce_stats gives
    return StepStats(
        loss=1.0,
        tokens=sum(tokens.values()),
        task_loss=task_loss,
        task_tokens=tokens,
        lr=1e-3,
        grad_norm=0.5,
    )


def test_a_task_absent_from_the_whole_interval_is_shown_absent_and_the_others_as_interval_means(
    caplog, monkeypatch
):
    steps = [
        _stats({"a": 2.0, "b": 1.0}, {"a": 10, "b": 30, "c": 0}),
        _stats({"a": 4.0}, {"a": 30, "b": 0, "c": 0}),
        _stats({"a": 1.0, "b": 3.0}, {"a": 5, "b": 10, "c": 0}),
    ]
    interval = TaskLossInterval()
    for stats in steps:
        interval.add(stats)
    means = interval.means()
    # token-weighted means of each task over the steps that held it
    assert math.isclose(means["a"], (2.0 * 10 + 4.0 * 30 + 1.0 * 5) / 45)
    assert math.isclose(means["b"], (1.0 * 30 + 3.0 * 10) / 40)
    assert means["c"] is None
    cfg = load_config(None, ["train.train_steps=3"])
    monkeypatch.setattr(
        distributed, "is_logging_rank", lambda: True
    )  # one process, no megatron groups
    with caplog.at_level(logging.INFO, logger="megamft"):
        log_step(
            cfg,
            3,
            steps[-1],
            0.1,
            {"tokens_per_second": 1.0, "tflops_per_device": 0.0, "memory_gb": 0.0},
            means,
        )
    line = caplog.records[-1].getMessage()
    assert f"| a {means['a']:.3f} b {means['b']:.3f} c absent |" in line and "nan" not in line, line


def test_a_present_task_whose_loss_diverged_still_shows_nan():
    interval = TaskLossInterval()
    interval.add(_stats({"a": float("nan"), "b": 1.0}, {"a": 4, "b": 4}))
    assert math.isnan(interval.means()["a"]) and interval.means()["b"] == 1.0


def test_the_final_summary_says_absent_for_a_task_without_learned_tokens(capsys):
    """`megamft train`'s closing table: a task whose validation rows hold no learned token is absent; a
    present task's nan (a divergence) is still printed as nan."""
    from megamft.cli import _print_summary
    from megamft.training.run_state import RunResult
    from megamft.training.step import StepStats

    def stats(a, b):
        return StepStats(
            loss=1.0,
            tokens=10,
            task_loss={"a": a, "b": b, "c": math.nan},
            task_tokens={"a": 6, "b": 4, "c": 0},
        )

    _print_summary(RunResult(valid_before=stats(2.0, 3.0), valid_after=stats(1.5, math.nan)))
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert table["a"] == ["2.000", "->", "1.500"]
    assert table["b"] == ["3.000", "->", "nan"]
    assert table["c"] == ["absent", "->", "absent"]
