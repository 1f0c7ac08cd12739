"""Multitask losses as per-token weights computed from global-batch statistics.

Every mode is a weighted sum of per-token losses, L = sum_i w_i * l_i, where
the weights depend only on loss masks, task ids and sample ids, which are
known before the forward pass:

    token        w_i = 1 / N                          (MFTCoder case 1)
    sample       w_i = 1 / (S * n_s)                  (case 2)
    task_token   w_i = a_t / (A * N_t)                (case 3, default)
    task_sample  w_i = a_t / (A * S_t * n_s)          (case 4)

N: learned tokens, S: samples with a learned token, n_s: learned tokens of
the token's sample, N_t / S_t: the same per task, a_t: the task's weight
(static weight x dynamic weight of focal/CoBa/FAMO), A = sum of a_t over the
tasks present. With N, S, N_t, S_t counted over the *whole* global batch (all
micro-batches, all DP ranks), L and its gradient do not depend on how the
batch is cut; `normalization="per_microbatch"` counts them per micro-batch
instead, as MFTCoder does.

`focal` is task_sample with each sample weighted by (1 - p_s)^gamma, p_s =
exp(-mean loss of the sample), and each task by (1 - p_t)^gamma from the
task's loss at the previous step (the current global value is unknown until
every micro-batch has run); both factors carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("token", "sample", "task_token", "task_sample", "focal", "coba", "famo")


@dataclass
class BatchCounts:
    """Learned-token and sample counts per task: float64 [num_tasks] each."""

    task_tokens: torch.Tensor
    task_samples: torch.Tensor

    @staticmethod
    def zeros(num_tasks: int) -> "BatchCounts":
        return BatchCounts(
            torch.zeros(num_tasks, dtype=torch.float64), torch.zeros(num_tasks, dtype=torch.float64)
        )

    def __add__(self, other: "BatchCounts") -> "BatchCounts":
        return BatchCounts(
            self.task_tokens + other.task_tokens, self.task_samples + other.task_samples
        )

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.task_tokens, self.task_samples])

    @staticmethod
    def from_tensor(flat: torch.Tensor) -> "BatchCounts":
        half = flat.numel() // 2
        return BatchCounts(flat[:half].clone(), flat[half:].clone())


def task_sums(values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum of `values` per task id: float64 [num_tasks], on the values' device."""
    out = torch.zeros(num_tasks, dtype=torch.float64, device=values.device)
    return out.index_add_(0, task_ids.reshape(-1), values.reshape(-1).double())


def sample_keys(sample_ids: torch.Tensor | None, shape: torch.Size, device=None) -> torch.Tensor:
    """A key per token, equal exactly for tokens of the same sample (row-local ids made global)."""
    device = sample_ids.device if sample_ids is not None else device
    rows = torch.arange(shape[0], device=device).unsqueeze(1).expand(shape)
    if sample_ids is None:
        return rows.reshape(-1)
    width = int(sample_ids.max()) + 1 if sample_ids.numel() else 1
    return (rows * width + sample_ids.long()).reshape(-1)


def sample_index(
    sample_ids: torch.Tensor | None, shape: torch.Size, device=None
) -> tuple[torch.Tensor, int]:
    """(index of each token's sample among the batch's samples, [tokens]; number of samples).

    Without sample ids each row is one sample. Data-dependent (unique): compute it on the
    host, where the ids come from; `device` places it when there are no ids.
    """
    unique, index = torch.unique(sample_keys(sample_ids, shape, device), return_inverse=True)
    return index, unique.numel()


def _per_sample(values: torch.Tensor, index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Per-sample sums of per-token values."""
    return torch.zeros(num_samples, dtype=values.dtype, device=values.device).index_add_(
        0, index, values
    )


def count(
    loss_mask: torch.Tensor,
    task_ids: torch.Tensor,
    sample_ids: torch.Tensor | None,
    num_tasks: int,
    samples: tuple[torch.Tensor, int] | None = None,
) -> BatchCounts:
    """Counts of one micro-batch (add them up, and all-reduce over DP, for a global batch).

    `samples`: `sample_index` of this micro-batch, when already computed.
    """
    mask = loss_mask.reshape(-1).double()
    tasks = task_ids.reshape(-1)
    index, num_samples = samples or sample_index(sample_ids, loss_mask.shape, loss_mask.device)
    per_sample_tokens = _per_sample(mask, index, num_samples)
    sample_task = torch.zeros(num_samples, dtype=torch.long, device=tasks.device).scatter_(
        0, index, tasks
    )
    has_tokens = (per_sample_tokens > 0).double()
    zeros = torch.zeros(num_tasks, dtype=torch.float64, device=mask.device)
    return BatchCounts(zeros.index_add(0, tasks, mask), zeros.index_add(0, sample_task, has_tokens))


def token_weights(
    mode: str,
    loss_mask: torch.Tensor,
    task_ids: torch.Tensor,
    sample_ids: torch.Tensor | None,
    counts: BatchCounts,
    task_weights: torch.Tensor,
    sample_factor: torch.Tensor | None = None,
    samples: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """w_i for every token of a micro-batch, given the normalizing counts (float64, on the mask's device).

    `samples`: `sample_index` of this micro-batch, when already computed.
    """
    mask = loss_mask.reshape(-1).double()
    tasks = task_ids.reshape(-1)
    token_counts, sample_counts = (
        counts.task_tokens.to(mask.device),
        counts.task_samples.to(mask.device),
    )
    present = token_counts > 0
    if mode == "token":
        weights = mask / token_counts.sum().clamp(min=1)
    elif mode == "sample":
        samples = samples or sample_index(sample_ids, loss_mask.shape, loss_mask.device)
        weights = mask / (sample_counts.sum().clamp(min=1) * _sample_tokens(mask, *samples))
    else:
        a = task_weights.to(mask.device).double() * present
        total = a.sum().clamp(min=1e-30)
        if mode == "task_token":
            weights = mask * a[tasks] / (total * token_counts.clamp(min=1)[tasks])
        else:  # task_sample and focal: per-task sample means
            samples = samples or sample_index(sample_ids, loss_mask.shape, loss_mask.device)
            n_s = _sample_tokens(mask, *samples)
            weights = mask * a[tasks] / (total * sample_counts.clamp(min=1)[tasks] * n_s)
    if sample_factor is not None:
        weights = weights * sample_factor.reshape(-1).double()
    return weights.reshape(loss_mask.shape)


def _sample_tokens(mask: torch.Tensor, index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """n_s of each token's sample (1 where the sample has no learned token)."""
    return _per_sample(mask, index, num_samples).clamp(min=1)[index]


def focal_sample_factor(
    per_token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    index: torch.Tensor,
    num_samples: int,
    gamma: float,
) -> torch.Tensor:
    """(1 - p_s)^gamma per token, p_s = exp(-mean loss of its sample); no gradient.

    `index`, `num_samples`: from `sample_index`, computed where the ids are (no sync on the device).
    """
    mask = loss_mask.reshape(-1).double()
    losses = per_token_loss.detach().reshape(-1).double() * mask
    index = index.reshape(-1)
    sums = _per_sample(losses, index, num_samples)
    tokens = _per_sample(mask, index, num_samples)
    p = torch.exp(-sums / tokens.clamp(min=1))
    return ((1 - p) ** gamma)[index].reshape(loss_mask.shape)


@dataclass
class LossOutput:
    """What the pure function returns."""

    loss: torch.Tensor  # scalar, differentiable
    task_loss: torch.Tensor  # [num_tasks] mean token loss per task (nan if absent)
    task_tokens: torch.Tensor  # [num_tasks] learned tokens per task
    task_weights: torch.Tensor  # [num_tasks] weights used


def multitask_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    mode: str = "task_token",
    sample_ids: torch.Tensor | None = None,
    task_weights: torch.Tensor | None = None,
    focal_gamma: float = 2.0,
    balancer=None,
) -> LossOutput:
    """The multitask loss of one batch, no process group needed.

    logits [B, S, V], labels / loss_mask / task_ids / sample_ids [B, S]. The
    batch is its own global batch. `balancer` (focal, CoBa or FAMO state from
    megamft.loss.balancers) supplies the dynamic task weights of those modes.
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return weigh_token_losses(
        per_token.view_as(labels),
        loss_mask,
        task_ids,
        num_tasks,
        mode,
        sample_ids,
        task_weights,
        focal_gamma,
        balancer,
    )


def weigh_token_losses(
    per_token: torch.Tensor,
    loss_mask: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    mode: str = "task_token",
    sample_ids: torch.Tensor | None = None,
    task_weights: torch.Tensor | None = None,
    focal_gamma: float = 2.0,
    balancer=None,
) -> LossOutput:
    """multitask_loss from per-token losses [B, S] instead of logits."""
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose from {MODES}")
    counts = count(loss_mask, task_ids, sample_ids, num_tasks)
    weights = effective_task_weights(mode, num_tasks, task_weights, balancer)
    factor = None
    if mode == "focal":
        factor = focal_sample_factor(
            per_token,
            loss_mask,
            *sample_index(sample_ids, loss_mask.shape, loss_mask.device),
            focal_gamma,
        )
    w = token_weights(
        structural_mode(mode), loss_mask, task_ids, sample_ids, counts, weights, factor
    )
    loss = (per_token * w.to(per_token.dtype)).sum()
    sums = task_sums(per_token.detach() * loss_mask, task_ids, num_tasks)
    task_loss = torch.where(
        counts.task_tokens > 0,
        sums / counts.task_tokens.clamp(min=1),
        torch.full_like(sums, float("nan")),
    )
    return LossOutput(loss, task_loss, counts.task_tokens, weights)


def effective_task_weights(
    mode: str, num_tasks: int, static: torch.Tensor | None, balancer
) -> torch.Tensor:
    """Static task weights combined with the balancer's dynamic ones (static x dynamic, except CoBa's
    default, whose weights replace the static ones once it starts updating); all ones by default."""
    weights = (
        torch.ones(num_tasks, dtype=torch.float64) if static is None else static.double().cpu()
    )
    if mode in ("coba", "famo", "focal"):
        if balancer is None:
            raise ValueError(f"loss mode {mode!r} needs its balancer state")
        weights = balancer.combine(weights)  # host-side state, like the balancers
    return weights


def structural_mode(mode: str) -> str:
    """The normalization a mode uses: balancers weigh tasks like task_token."""
    return {"coba": "task_token", "famo": "task_token", "focal": "task_sample"}.get(mode, mode)
