"""Dynamic task weights: focal (task level), CoBa and FAMO.

A balancer hands out task weights before a step (`before_step`, `weights()`),
learns from what the step or a validation showed (`after_train_step`,
`observe_validation`), and round-trips through checkpoints (`state_dict` /
`load_state_dict`). `combine` turns the config's static per-task weights into
the step's effective weights (by default static x dynamic). Steps passed to
`before_step` and `observe_validation` are 0-based step indices.
"""

from __future__ import annotations

import torch

from megamft.config import ConfigError


class TaskBalancer:
    """Defaults shared by the balancers."""

    def before_step(self, step: int) -> None:
        """Called before step `step` runs (0-based)."""

    def after_train_step(self, step: int, task_loss: torch.Tensor) -> None:
        """The per-task training losses of the step just done."""

    def observe_validation(self, step: int, task_loss: torch.Tensor) -> None:
        """A validation measurement taken after step `step`."""

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, static: torch.Tensor) -> torch.Tensor:
        """The step's task weights from the static ones: their product."""
        return static * self.weights().double().cpu()


class FocalTaskWeights(TaskBalancer):
    """(1 - p_t)^gamma per task, p_t = exp(-task loss of the previous step)."""

    def __init__(self, num_tasks: int, gamma: float):
        self.gamma = gamma
        self.last_loss = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        known = torch.isfinite(self.last_loss)
        focal = (1 - torch.exp(-self.last_loss.clamp(min=0))) ** self.gamma
        return torch.where(known, focal, torch.ones_like(focal))

    def after_train_step(self, step: int, task_loss: torch.Tensor) -> None:
        present = torch.isfinite(task_loss)
        self.last_loss = torch.where(present, task_loss.double(), self.last_loss)

    def state_dict(self) -> dict:
        return {"last_loss": self.last_loss.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.last_loss = state["last_loss"].clone()


def window_slope(values: torch.Tensor) -> float:
    """Least-squares slope of values against their index (0 with fewer than 2 points)."""
    if values.numel() < 2:
        return 0.0
    x = torch.arange(values.numel(), dtype=torch.float64)
    x = x - x.mean()
    return float((x * (values.double() - values.double().mean())).sum() / (x * x).sum())


def nonzero_slope(values: torch.Tensor) -> float:
    """Slope of the non-zero values against 0, 1, 2, ... (a zero marks a task absent from the batch)."""
    return window_slope(values[values != 0])


_TINY = 1e-300  # guards 0/0 when every slope in a window is exactly zero (MFTCoder gives NaN there)


class CoBa(TaskBalancer):
    """Convergence balancer (CoBa, EMNLP 2024) from per-task validation-loss slopes.

    Follows MFTCoder's CoBa (mftcoder_accelerate) by default; steps are 0-based
    counts of completed optimizer steps. The normalizer is the per-task loss of an
    evaluation before step 0 (`set_normalizer`). After step s, for s >= 1 and
    s % update_interval == 0, one validation measurement is recorded (a task
    absent from it reads 0 and is left out of slope fits). Before step s, for
    s >= warmup and s % update_interval == 0, the weights are recomputed:

    - each task's slope, and the slope of the worst (max over tasks) loss, are
      least-squares fits over the last s - max(0, s // interval - history)
      measurements, zeros dropped;
    - RCS = softmax(K * slope / sum|slope|): a task converging faster gets less;
    - ACS = softmax(-n * slope / sum over its slope history of |slope|), the
      history being the per-task slopes since warm-up from index
      max(0, s // interval - history) on: a task whose loss turns upward gets less;
    - divergence factor DF = N * softmax(-tau * N * w / sum|w|)[-1] over the N
      worst-loss slopes since warm-up;
    - weights = softmax(K * (DF * RCS + (1 - DF) * ACS)), floored at min_weight.

    Before the first update the static task weights apply; afterwards CoBa's
    weights replace them (`static_weights="replace"`).

    megamft's options (off by default): `divergence_history="window"` fits DF
    over the last `history` worst-loss slopes instead of all since warm-up, and
    `clamp_divergence` keeps DF <= 1 so the mix stays a convex combination;
    `static_weights="multiply"` keeps the static weights as a factor.
    """

    def __init__(
        self,
        num_tasks: int,
        warmup: int = 100,
        history: int = 200,
        temperature: float = 5.0,
        update_interval: int = 1,
        min_weight: float | None = None,
        divergence_history: str = "all",
        clamp_divergence: bool = False,
        static_weights: str = "replace",
    ):
        self.num_tasks = num_tasks
        self.warmup = warmup
        self.history = history
        self.temperature = temperature
        self.update_interval = update_interval
        self.min_weight = 1 / (10 * num_tasks) if min_weight is None else min_weight
        self.divergence_history = divergence_history
        self.clamp_divergence = clamp_divergence
        self.static_weights = static_weights
        self.normalizer: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []  # raw measurements not yet read to the host
        self.losses: list[torch.Tensor] = []  # normalized measurements, host float64
        self.task_slopes: list[torch.Tensor] = []  # per-task slopes, one per update since warm-up
        self.worst_slopes: list[float] = []  # slope of the worst task's loss, one per update
        self._weights: torch.Tensor | None = None  # None until the first update
        self.divergence: float | None = None  # the last update's divergence factor (for logs)

    # --- schedule -----------------------------------------------------------------------------
    def wants_validation(self, step: int) -> bool:
        """Whether a measurement is taken after step `step` (0-based, the step just completed)."""
        return step >= 1 and step % self.update_interval == 0

    def before_step(self, step: int) -> None:
        if step >= self.warmup and step % self.update_interval == 0:
            self._update(step)

    def set_normalizer(self, task_loss: torch.Tensor) -> None:
        """Per-task loss of the evaluation before step 0 (kept when already set, e.g. on resume)."""
        if self.normalizer is None:
            self.normalizer = task_loss.detach().double().cpu()

    def observe_validation(self, step: int, task_loss: torch.Tensor) -> None:
        """Record the measurement after step `step`; it may stay on the device until an update needs it."""
        self._pending.append(task_loss.detach())

    # --- weights ------------------------------------------------------------------------------
    def weights(self) -> torch.Tensor:
        if self._weights is None:
            return torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=torch.float64)
        return self._weights.clone()

    def combine(self, static: torch.Tensor) -> torch.Tensor:
        if self.static_weights == "multiply":
            return static * self.weights()
        return static.clone() if self._weights is None else self.weights()

    def _read_pending(self) -> None:
        """One device-to-host read for every measurement taken since the last update."""
        if not self._pending:
            return
        if self.normalizer is None:
            raise RuntimeError(
                "CoBa needs the per-task loss before step 0 (set_normalizer) before measurements"
            )
        raw = torch.stack(self._pending).double().cpu()
        self._pending = []
        self.losses += list(raw / self.normalizer.clamp(min=_TINY))

    def _update(self, step: int) -> None:
        self._read_pending()
        if not self.losses:
            return  # nothing measured yet (warm-up shorter than the first measurement)
        start = max(0, step // self.update_interval - self.history)
        window = torch.stack(self.losses[-(step - start) :])  # [measurements, tasks]
        slopes = torch.tensor(
            [nonzero_slope(window[:, t]) for t in range(self.num_tasks)], dtype=torch.float64
        )
        self.task_slopes.append(slopes)
        self.worst_slopes.append(nonzero_slope(window.max(dim=1).values))
        k = self.num_tasks
        rcs = torch.softmax(k * slopes / slopes.abs().sum().clamp(min=_TINY), dim=0)
        # MFTCoder indexes the slope list (which starts at warm-up) by `start`; it fails where that
        # runs past the list (history < warmup / interval), so keep at least the latest slopes.
        own = torch.stack(
            self.task_slopes[min(start, len(self.task_slopes) - 1) :]
        )  # [updates, tasks]
        acs = torch.softmax(-own.shape[0] * slopes / own.abs().sum(dim=0).clamp(min=_TINY), dim=0)
        divergence = self.divergence = self._divergence()
        weights = torch.softmax(k * (divergence * rcs + (1 - divergence) * acs), dim=0)
        if (weights < self.min_weight).any():
            weights = weights * (1 - self.min_weight * k) + self.min_weight
        self._weights = weights

    def _divergence(self) -> float:
        worst = (
            self.worst_slopes
            if self.divergence_history == "all"
            else self.worst_slopes[-self.history :]
        )
        worst = torch.tensor(worst, dtype=torch.float64)
        n = len(worst)
        scaled = -n * worst / worst.abs().sum().clamp(min=_TINY)
        divergence = float(torch.softmax(self.temperature * scaled, dim=0)[-1] * n)
        return min(divergence, 1.0) if self.clamp_divergence else divergence

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._read_pending()
        return {
            "normalizer": self.normalizer,
            "losses": [t.clone() for t in self.losses],
            "task_slopes": [t.clone() for t in self.task_slopes],
            "worst_slopes": list(self.worst_slopes),
            "weights": None if self._weights is None else self._weights.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "normalizer" not in state:
            raise ConfigError(
                "this checkpoint's CoBa state comes from an older megamft whose CoBa measured "
                "differently; resume with checkpoint.load_optimizer=false or loss.mode other than coba"
            )
        self.normalizer = state["normalizer"]
        self._pending = []
        self.losses = [t.clone() for t in state["losses"]]
        self.task_slopes = [t.clone() for t in state["task_slopes"]]
        self.worst_slopes = list(state["worst_slopes"])
        self._weights = None if state["weights"] is None else state["weights"].clone()


class FAMO(TaskBalancer):
    """Fast adaptive multitask optimization (Liu et al., NeurIPS 2023).

    Keeps logits xi; z = softmax(xi). The step minimizes sum_t z_t * log(l_t),
    i.e. task t's mean loss weighted by z_t / l_t (l_t from the previous step,
    as the weights must be known before the forward pass). After each step,
    d_t = log l_t(before) - log l_t(after) is the observed improvement and xi
    takes a gradient step on z . d (plus weight decay), lowering the weight of
    tasks that improved most.
    """

    def __init__(
        self, num_tasks: int, lr: float = 0.025, decay: float = 1e-3, min_loss: float = 1e-8
    ):
        self.lr = lr
        self.decay = decay
        self.min_loss = min_loss
        self.logits = torch.zeros(num_tasks, dtype=torch.float64)
        self.last_loss = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def task_probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def weights(self) -> torch.Tensor:
        z = self.task_probabilities()
        known = torch.isfinite(self.last_loss)
        inverse = torch.where(
            known, 1 / self.last_loss.clamp(min=self.min_loss), torch.ones_like(z)
        )
        weights = z * inverse
        return weights / weights.sum()

    def after_train_step(self, step: int, task_loss: torch.Tensor) -> None:
        loss = task_loss.double()
        both = torch.isfinite(loss) & torch.isfinite(self.last_loss)
        if both.any():
            improvement = torch.where(
                both,
                torch.log(self.last_loss.clamp(min=self.min_loss))
                - torch.log(loss.clamp(min=self.min_loss)),
                torch.zeros_like(loss),
            )
            z = self.task_probabilities()
            # d(z . d)/d xi = J_softmax^T d = z * (d - z . d)
            grad = z * (improvement - (z * improvement).sum())
            self.logits = self.logits - self.lr * (grad + self.decay * self.logits)
        self.last_loss = torch.where(torch.isfinite(loss), loss, self.last_loss)

    def state_dict(self) -> dict:
        return {"logits": self.logits.clone(), "last_loss": self.last_loss.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.logits = state["logits"].clone()
        self.last_loss = state["last_loss"].clone()


def make_balancer(loss_cfg, num_tasks: int):
    """The balancer a loss mode needs, or None for static modes."""
    if loss_cfg.mode == "focal":
        return FocalTaskWeights(num_tasks, loss_cfg.focal_gamma)
    if loss_cfg.mode == "coba":
        return CoBa(
            num_tasks,
            warmup=loss_cfg.coba_warmup,
            history=loss_cfg.coba_history,
            temperature=loss_cfg.coba_temperature,
            update_interval=loss_cfg.coba_update_interval,
            min_weight=loss_cfg.coba_min_weight,
            divergence_history=loss_cfg.coba_divergence_history,
            clamp_divergence=loss_cfg.coba_clamp_divergence,
            static_weights=loss_cfg.coba_static_weights,
        )
    if loss_cfg.mode == "famo":
        return FAMO(num_tasks, loss_cfg.famo_lr, loss_cfg.famo_decay)
    return None
