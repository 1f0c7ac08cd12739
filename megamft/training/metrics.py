"""Tensorboard scalars, written by the logging rank only."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megamft.training.step import StepStats


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged task logs a large number instead of overflowing."""
    return math.exp(min(loss, 50.0))


class TaskLossInterval:
    """Each task's token-mean loss over the steps of a log interval; a task with no learned token in any of
    them has none (shown as absent: a nan there would read like a divergence)."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._tokens: dict[str, int] = {}

    def add(self, stats: StepStats) -> None:
        for task, loss in stats.task_loss.items():
            tokens = stats.task_tokens.get(task, 0)
            self._tokens[task] = self._tokens.get(task, 0) + tokens
            self._sums[task] = self._sums.get(task, 0.0) + (loss * tokens if tokens else 0.0)

    def means(self) -> dict[str, float | None]:
        """Per task, its mean token loss over the interval, None when it had no learned token."""
        return {task: self._sums[task] / tokens if tokens else None for task, tokens in self._tokens.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._tokens.clear()


def present_task_losses(stats: StepStats) -> dict[str, float | None]:
    """One step's (or validation's) task losses, None for a task with no learned token in it."""
    return {task: loss if stats.task_tokens.get(task, 0) else None for task, loss in stats.task_loss.items()}


def format_task_losses(values: dict[str, float | None]) -> str:
    """'a 1.234 b absent': each task's loss, or 'absent' for a task that had no learned token."""
    return " ".join(f"{name} {'absent' if value is None else f'{value:.3f}'}" for name, value in values.items())


class MetricsWriter:
    """train/... every step, valid/... at every validation; no-op when disabled."""

    def __init__(self, log_dir: str | Path | None, enabled: bool):
        self._writer = None
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def train(self, step: int, stats: StepStats, tokens_per_second: float, extra: dict | None = None) -> None:
        if self._writer is None:
            return
        scalars = {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
                   "train/tokens_per_second": tokens_per_second, "train/skipped": float(stats.skipped)}
        scalars.update({f"train/{k}": v for k, v in (extra or {}).items()})
        for task, loss in stats.task_loss.items():
            if math.isfinite(loss):
                scalars[f"train/loss/{task}"] = loss
                scalars[f"train/ppl/{task}"] = perplexity(loss)
            scalars[f"train/tokens/{task}"] = stats.task_tokens[task]
        for task, weight in stats.task_weights.items():
            scalars[f"train/weight/{task}"] = weight
        for name, value in stats.router_losses.items():  # MoE auxiliary losses, apart from the task losses
            scalars[f"train/router/{name}"] = value
        self._write(step, scalars)

    def experts(self, step: int, counts, shares: dict, task_names: tuple[str, ...]) -> None:
        """MoE: each task's share of routed tokens per expert (scalars) and per layer (histograms)."""
        if self._writer is None:
            return
        scalars = {f"experts/{task}/expert_{e:03d}": float(v) for task, share in shares.items()
                   for e, v in enumerate(share)}
        self._write(step, scalars)
        for t, task in enumerate(task_names):
            for layer in range(counts.shape[0]):
                per_expert = counts[layer, t].double()
                if per_expert.sum() > 0:  # one bucket per expert, its height the tokens routed there
                    self._writer.add_histogram_raw(
                        f"experts/{task}/layer_{layer}", min=0, max=len(per_expert) - 1, num=float(per_expert.sum()),
                        sum=float((per_expert * torch.arange(len(per_expert))).sum()),
                        sum_squares=float((per_expert * torch.arange(len(per_expert)) ** 2).sum()),
                        bucket_limits=[e + 0.5 for e in range(len(per_expert))], bucket_counts=per_expert.tolist(),
                        global_step=step)
        self._writer.flush()

    def valid(self, step: int, stats: StepStats) -> None:
        if self._writer is None:
            return
        scalars = {"valid/loss": stats.loss}
        for task, loss in stats.task_loss.items():
            if math.isfinite(loss):
                scalars[f"valid/loss/{task}"] = loss
                scalars[f"valid/ppl/{task}"] = perplexity(loss)
        self._write(step, scalars)

    def _write(self, step: int, scalars: dict) -> None:
        for name, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
