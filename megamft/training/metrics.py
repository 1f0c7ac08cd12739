"""A run's scalars, written by the logging rank only, under one set of names to every sink:
TensorBoard, `metrics.jsonl` (one JSON object per step and kind: {"step": s, name: value, ...}) and,
when train.wandb_project is set, Weights & Biases (megamft.training.wandb_sink).

Names: train/loss, train/loss/<task>, train/tokens_per_second, ...; valid/loss, valid/loss/<task>;
eval/<benchmark>/pass@<k>; memory/estimate_gb at start. A resumed run appends to the same files:
a step logged twice (the steps after the checkpoint it resumed from) is read by its last line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from megamft.sizing.memory import estimate
from megamft.training.step import StepStats

METRICS_FILE = "metrics.jsonl"


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged task logs a large number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def tensorboard_dir(cfg) -> str | None:
    if cfg.train.tensorboard_dir:
        return cfg.train.tensorboard_dir
    return str(Path(cfg.checkpoint.save_dir) / "tensorboard") if cfg.checkpoint.save_dir else None


def metrics_file(cfg) -> Path | None:
    """<checkpoint.save_dir>/metrics.jsonl, else beside the tensorboard files, else none."""
    if cfg.checkpoint.save_dir:
        return Path(cfg.checkpoint.save_dir) / METRICS_FILE
    return Path(cfg.train.tensorboard_dir) / METRICS_FILE if cfg.train.tensorboard_dir else None


class TensorBoardSink:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, scalars: dict) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class JsonLinesSink:
    """Appends one line per write, flushed, so that a reader (or a killed run) sees whole lines."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(path, "a", encoding="utf-8")

    def write(self, step: int, scalars: dict) -> None:
        self.stream.write(json.dumps({"step": step, **scalars}) + "\n")
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def close(self) -> None:
        self.stream.close()


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
        return {
            task: self._sums[task] / tokens if tokens else None
            for task, tokens in self._tokens.items()
        }

    def reset(self) -> None:
        self._sums.clear()
        self._tokens.clear()


def present_task_losses(stats: StepStats) -> dict[str, float | None]:
    """One step's (or validation's) task losses, None for a task with no learned token in it."""
    return {
        task: loss if stats.task_tokens.get(task, 0) else None
        for task, loss in stats.task_loss.items()
    }


def format_task_losses(values: dict[str, float | None]) -> str:
    """'a 1.234 b absent': each task's loss, or 'absent' for a task that had no learned token."""
    return " ".join(
        f"{name} {'absent' if value is None else f'{value:.3f}'}" for name, value in values.items()
    )


class MetricsWriter:
    """train/... every step, valid/... at every validation, eval/... at every evaluation; a no-op when
    disabled (ranks other than the logging one) or without sinks."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self._tensorboard = next((s.writer for s in sinks if isinstance(s, TensorBoardSink)), None)

    @classmethod
    def for_run(cls, cfg, enabled: bool, vocab_size: int) -> "MetricsWriter":
        """The configured sinks; memory/estimate_gb (megamft.sizing.memory) logged at step 0."""
        if not enabled:
            return cls([])
        sinks = []
        if tensorboard_dir(cfg):
            sinks.append(TensorBoardSink(tensorboard_dir(cfg)))
        if metrics_file(cfg):
            sinks.append(JsonLinesSink(metrics_file(cfg)))
        if cfg.train.wandb_project:
            from megamft.training.wandb_sink import WandbSink

            sinks.append(WandbSink(cfg))
        writer = cls(sinks)
        memory = estimate(cfg, torch.distributed.get_world_size(), vocab_size)
        writer.scalars(
            0,
            {
                f"memory/estimate_gb/{part}": getattr(memory, part) / 2**30
                for part in ("weights", "gradients", "optimizer", "activations")
            }
            | {"memory/estimate_gb": memory.total / 2**30},
        )
        return writer

    def train(
        self, step: int, stats: StepStats, tokens_per_second: float, extra: dict | None = None
    ) -> None:
        if not self.sinks:
            return
        scalars = {
            "train/loss": stats.loss,
            "train/lr": stats.lr,
            "train/grad_norm": stats.grad_norm,
            "train/tokens_per_second": tokens_per_second,
            "train/skipped": float(stats.skipped),
        }
        scalars.update({f"train/{k}": v for k, v in (extra or {}).items()})
        for task, loss in stats.task_loss.items():
            if math.isfinite(loss):
                scalars[f"train/loss/{task}"] = loss
                scalars[f"train/ppl/{task}"] = perplexity(loss)
            scalars[f"train/tokens/{task}"] = stats.task_tokens[task]
        for task, weight in stats.task_weights.items():
            scalars[f"train/weight/{task}"] = weight
        for (
            name,
            value,
        ) in stats.router_losses.items():  # MoE auxiliary losses, apart from the task losses
            scalars[f"train/router/{name}"] = value
        scalars.update(_preference_scalars("train", stats))
        self.scalars(step, scalars)

    def experts(self, step: int, counts, shares: dict, task_names: tuple[str, ...]) -> None:
        """MoE: each task's share of routed tokens per expert (scalars) and per layer (TensorBoard histograms)."""
        self.scalars(
            step,
            {
                f"experts/{task}/expert_{e:03d}": float(v)
                for task, share in shares.items()
                for e, v in enumerate(share)
            },
        )
        if self._tensorboard is None:
            return
        for t, task in enumerate(task_names):
            for layer in range(counts.shape[0]):
                per_expert = counts[layer, t].double()
                if (
                    per_expert.sum() > 0
                ):  # one bucket per expert, its height the tokens routed there
                    self._tensorboard.add_histogram_raw(
                        f"experts/{task}/layer_{layer}",
                        min=0,
                        max=len(per_expert) - 1,
                        num=float(per_expert.sum()),
                        sum=float((per_expert * torch.arange(len(per_expert))).sum()),
                        sum_squares=float((per_expert * torch.arange(len(per_expert)) ** 2).sum()),
                        bucket_limits=[e + 0.5 for e in range(len(per_expert))],
                        bucket_counts=per_expert.tolist(),
                        global_step=step,
                    )
        self._tensorboard.flush()

    def valid(self, step: int, stats: StepStats) -> None:
        scalars = {"valid/loss": stats.loss}
        for task, loss in stats.task_loss.items():
            if math.isfinite(loss):
                scalars[f"valid/loss/{task}"] = loss
                scalars[f"valid/ppl/{task}"] = perplexity(loss)
        scalars.update(_preference_scalars("valid", stats))
        self.scalars(step, scalars)

    def scalars(self, step: int, scalars: dict) -> None:
        """Any named scalars (None values left out), to every sink."""
        scalars = {name: float(value) for name, value in scalars.items() if value is not None}
        for sink in self.sinks:
            sink.write(step, scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _preference_scalars(prefix: str, stats: StepStats) -> dict:
    """Preference objectives: {prefix}/rewards/chosen/{task} (and rejected, margin, accuracy), finite ones."""
    return {
        f"{prefix}/{name}/{task}": value
        for name, per_task in stats.preference.items()
        for task, value in per_task.items()
        if math.isfinite(value)
    }
