"""What a training run carries from step to step (Run) and reports back (RunResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamft.checkpoint import dist_checkpoint
from megamft.config import MegamftConfig
from megamft.data.dataset import MultitaskData
from megamft.errors import UserError
from megamft.training.code_eval import CodeEvaluator
from megamft.training.expert_stats import ExpertStats
from megamft.training.metrics import MetricsWriter
from megamft.training.selection import Selection
from megamft.training.setup import TrainingState
from megamft.training.step import StepStats


class TrainingDiverged(UserError, RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient (the learning rate or the data)."""


@dataclass
class RunResult:
    """What a run reports back (identical on every rank)."""

    history: list[StepStats] = field(default_factory=list)
    valid_before: StepStats | None = None
    valid_after: StepStats | None = None
    last_checkpoint: str | None = None
    preempted: bool = False
    skipped_steps: int = 0
    loss_scale_skips: int = 0  # fp16 steps the loss scaler skipped while calibrating its scale
    task_samples: dict[str, int] = field(default_factory=dict)  # training samples consumed per task
    best: dict | None = (
        None  # model selection: metric, step, score and checkpoint of the best measurement
    )
    stopped_early: bool = False  # train.early_stopping_patience measurements without improvement


@dataclass
class Run:
    """Everything the loop carries from step to step."""

    cfg: MegamftConfig
    state: TrainingState
    data: MultitaskData
    balancer: object
    static_weights: torch.Tensor
    metrics: MetricsWriter
    result: RunResult = field(default_factory=RunResult)
    iteration: int = 0
    consumed: int = 0
    skipped_in_a_row: int = 0
    async_saves: dist_checkpoint.AsyncSaves | None = None
    lora_base: dict | None = None  # base weights of adapter-only checkpoints
    coba_stream: list | None = (
        None  # CoBa's sampled validation micro-batches on this rank, built once
    )
    expert_stats: ExpertStats | None = None  # MoE: tokens per task and expert over the log interval
    selection: Selection | None = None  # checkpoint.keep_best and early stopping
    evaluator: CodeEvaluator | None = None  # eval.problems: pass@k at the training layout
    preference: object | None = None  # preference_run.PreferenceRun: loss.objective other than sft

    def finish_saves(self) -> None:
        if self.async_saves is not None:
            self.async_saves.wait()

    def abandon_saves(self) -> None:
        """A run that failed or was interrupted: no save still in flight is published or left behind."""
        if self.async_saves is not None:
            self.async_saves.abandon()
