"""Model selection: which checkpoints score best on one metric, and when training stops improving.

Every measurement of ``checkpoint.best_metric`` (a validation or an in-training evaluation) is
offered to `Selection.observe`. It keeps the ``checkpoint.keep_best`` best (step, score) pairs,
the best so far, and how many measurements in a row did not improve on it
(``train.early_stopping_patience``). A measurement that ranks among the kept ones is saved at
once, so the checkpoints kept for their score are exactly the measured weights; pruning spares
them (`kept`), and ``<save_dir>/best`` names the best. The state travels with every checkpoint
(`state_dict`), so a resumed run ranks and counts as the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megamft.checkpoint.layout import iteration_dir
from megamft.config import ConfigError, MegamftConfig
from megamft.config.eval_checks import unknown_task_problems


def lower_is_better(metric: str) -> bool:
    """Losses rank lower first; pass@k higher first."""
    return not metric.rsplit("/", 1)[-1].startswith("pass@")


def validation_scores(stats) -> dict[str, float]:
    """A validation's StepStats as metric names: valid/loss and valid/loss/<task>."""
    if stats is None:
        return {}
    return {
        "valid/loss": stats.loss,
        **{f"valid/loss/{task}": loss for task, loss in stats.task_loss.items()},
    }


@dataclass
class Selection:
    """The ranking of measured checkpoints and the early-stopping count (see the module docstring)."""

    metric: str
    keep: int = 0
    patience: int = 0
    min_delta: float = 0.0
    ranked: list[tuple[int, float]] = field(default_factory=list)
    """The `keep` best (step, score) pairs, best first (ties: the earlier step first)."""
    best: tuple[int, float] | None = None
    stalled: int = 0
    """Measurements in a row that did not improve on `best` by more than min_delta."""
    last_step: int | None = None

    @classmethod
    def from_config(cls, cfg: MegamftConfig, task_names=()) -> "Selection":
        """Refuses (ConfigError) a valid/loss/<task> of a task the data does not have."""
        problems = unknown_task_problems(cfg.checkpoint.best_metric, task_names)
        if problems and (cfg.checkpoint.keep_best or cfg.train.early_stopping_patience):
            raise ConfigError(problems)
        return cls(
            cfg.checkpoint.best_metric,
            cfg.checkpoint.keep_best,
            cfg.train.early_stopping_patience,
            cfg.train.early_stopping_min_delta,
        )

    @property
    def active(self) -> bool:
        return bool(self.keep or self.patience)

    def _key(self, score: float) -> float:
        """Smaller is better; a non-finite score ranks last."""
        if not math.isfinite(score):
            return math.inf
        return score if lower_is_better(self.metric) else -score

    def observe(self, step: int, scores: dict[str, float]) -> bool:
        """Take this step's measurements; True when the step ranks among the kept ones (to be saved now)."""
        if not self.active or self.metric not in scores or step == self.last_step:
            return False
        self.last_step = step
        score = float(scores[self.metric])
        if self.best is None or self._key(score) < self._key(self.best[1]) - self.min_delta:
            self.best, self.stalled = (step, score), 0
        else:
            self.stalled += 1
        if not self.keep:
            return False
        self.ranked = sorted(
            [*self.ranked, (step, score)], key=lambda pair: (self._key(pair[1]), pair[0])
        )
        self.ranked = self.ranked[: self.keep]
        return any(kept == step for kept, _ in self.ranked)

    def kept(self) -> set[int]:
        """Iterations pruning must spare for their score."""
        return {step for step, _ in self.ranked}

    def best_kept(self) -> int | None:
        """The iteration `<save_dir>/best` names: the best of the kept checkpoints."""
        return self.ranked[0][0] if self.ranked else None

    def should_stop(self) -> bool:
        return bool(self.patience) and self.stalled >= self.patience

    def state_dict(self) -> dict:
        return {
            "metric": self.metric,
            "ranked": [list(pair) for pair in self.ranked],
            "best": list(self.best) if self.best else None,
            "stalled": self.stalled,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict | None) -> bool:
        """Restore a saved ranking; False (nothing restored) when none was saved or it ranks another metric."""
        if not state or state.get("metric") != self.metric:
            return False
        self.ranked = [(int(step), float(score)) for step, score in state["ranked"]][: self.keep]
        self.best = (int(state["best"][0]), float(state["best"][1])) if state.get("best") else None
        self.stalled, self.last_step = int(state["stalled"]), state.get("last_step")
        return True


def best_summary(selection: Selection, save_dir: str | None) -> dict | None:
    """What the run's summary says of the best measurement: metric, step, score and, when one was kept
    for it, its checkpoint (with keep_best, `<save_dir>/best` names the same)."""
    if not selection.active or selection.best is None:
        return None
    step, score = selection.best
    checkpoint = None
    if save_dir and selection.best_kept() is not None:
        step, score = selection.ranked[0]
        checkpoint = str(iteration_dir(save_dir, step))
    return {"metric": selection.metric, "step": step, "score": score, "checkpoint": checkpoint}
