"""Dynamic task weights: focal (task level), CoBa and FAMO.

A balancer hands out task weights before a step (`weights()`), learns from
what the step or a validation showed (`after_train_step`, `observe_validation`),
and round-trips through checkpoints (`state_dict` / `load_state_dict`). Its
weights multiply the static per-task weights of the config.
"""

from __future__ import annotations


import torch


class FocalTaskWeights:
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

    def observe_validation(self, step: int, task_loss: torch.Tensor) -> None:
        pass

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


class CoBa:
    """Convergence balancer (CoBa, EMNLP 2024) from per-task validation-loss slopes.

    Validation losses are divided by each task's first observation; slopes are
    fitted over the last `history` observations. Relative convergence (RCS):
    a task whose loss falls faster than the others' gets less weight. Absolute
    convergence (ACS): a task whose slope turns upward relative to its own
    history gets more weight. A divergence factor, from how the slope of the
    worst task's loss compares with its history, mixes the two. Weights start
    uniform, change only after `warmup` observations, and never drop below
    `min_weight` (default 1 / (10 * tasks)).
    """

    def __init__(self, num_tasks: int, history: int = 20, warmup: int = 5, temperature: float = 5.0,
                 min_weight: float | None = None):
        self.num_tasks = num_tasks
        self.history = history
        self.warmup = warmup
        self.temperature = temperature
        self.min_weight = 1 / (10 * num_tasks) if min_weight is None else min_weight
        self.first = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.losses: list[torch.Tensor] = []        # normalized validation losses
        self.task_slopes: list[torch.Tensor] = []   # per-task slope at each update
        self.worst_slopes: list[float] = []         # slope of the max-over-tasks loss
        self._weights = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        return self._weights.clone()

    def after_train_step(self, step: int, task_loss: torch.Tensor) -> None:
        pass

    def observe_validation(self, step: int, task_loss: torch.Tensor) -> None:
        loss = task_loss.double()
        self.first = torch.where(torch.isnan(self.first), loss, self.first)
        self.losses.append(loss / self.first.clamp(min=1e-12))
        window = torch.stack(self.losses[-self.history:])
        self.task_slopes.append(
            torch.tensor([window_slope(window[:, t]) for t in range(self.num_tasks)], dtype=torch.float64))
        self.worst_slopes.append(window_slope(window.max(dim=1).values))
        if len(self.losses) >= self.warmup:
            self._weights = self._compute()

    def _compute(self) -> torch.Tensor:
        k = self.num_tasks
        slopes = self.task_slopes[-1]
        rcs = torch.softmax(k * slopes / slopes.abs().sum().clamp(min=1e-12), dim=0)
        own_history = torch.stack(self.task_slopes[-self.history:])          # [steps, tasks]
        steps = own_history.shape[0]
        acs = torch.softmax(-steps * slopes / own_history.abs().sum(dim=0).clamp(min=1e-12), dim=0)
        worst = torch.tensor(self.worst_slopes[-self.history:], dtype=torch.float64)
        scaled = -len(worst) * worst / worst.abs().sum().clamp(min=1e-12)
        divergence = float(torch.softmax(self.temperature * scaled, dim=0)[-1] * len(worst))
        divergence = min(max(divergence, 0.0), 1.0)
        weights = torch.softmax(k * (divergence * rcs + (1 - divergence) * acs), dim=0)
        if (weights < self.min_weight).any():
            weights = weights * (1 - self.min_weight * k) + self.min_weight
        return weights

    def state_dict(self) -> dict:
        return {"first": self.first.clone(), "losses": [t.clone() for t in self.losses],
                "task_slopes": [t.clone() for t in self.task_slopes], "worst_slopes": list(self.worst_slopes),
                "weights": self._weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.first = state["first"].clone()
        self.losses = [t.clone() for t in state["losses"]]
        self.task_slopes = [t.clone() for t in state["task_slopes"]]
        self.worst_slopes = list(state["worst_slopes"])
        self._weights = state["weights"].clone()


class FAMO:
    """Fast adaptive multitask optimization (Liu et al., NeurIPS 2023).

    Keeps logits xi; z = softmax(xi). The step minimizes sum_t z_t * log(l_t),
    i.e. task t's mean loss weighted by z_t / l_t (l_t from the previous step,
    as the weights must be known before the forward pass). After each step,
    d_t = log l_t(before) - log l_t(after) is the observed improvement and xi
    takes a gradient step on z . d (plus weight decay), lowering the weight of
    tasks that improved most.
    """

    def __init__(self, num_tasks: int, lr: float = 0.025, decay: float = 1e-3, min_loss: float = 1e-8):
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
        inverse = torch.where(known, 1 / self.last_loss.clamp(min=self.min_loss), torch.ones_like(z))
        weights = z * inverse
        return weights / weights.sum()

    def after_train_step(self, step: int, task_loss: torch.Tensor) -> None:
        loss = task_loss.double()
        both = torch.isfinite(loss) & torch.isfinite(self.last_loss)
        if both.any():
            improvement = torch.where(
                both, torch.log(self.last_loss.clamp(min=self.min_loss)) - torch.log(loss.clamp(min=self.min_loss)),
                torch.zeros_like(loss))
            z = self.task_probabilities()
            # d(z . d)/d xi = J_softmax^T d = z * (d - z . d)
            grad = z * (improvement - (z * improvement).sum())
            self.logits = self.logits - self.lr * (grad + self.decay * self.logits)
        self.last_loss = torch.where(torch.isfinite(loss), loss, self.last_loss)

    def observe_validation(self, step: int, task_loss: torch.Tensor) -> None:
        pass

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
        return CoBa(num_tasks, loss_cfg.coba_history, loss_cfg.coba_warmup, loss_cfg.coba_temperature,
                    loss_cfg.coba_min_weight)
    if loss_cfg.mode == "famo":
        return FAMO(num_tasks, loss_cfg.famo_lr, loss_cfg.famo_decay)
    return None
