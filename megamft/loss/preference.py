"""Preference objectives on per-sequence answer log-probabilities: DPO, RPO, ORPO and SimPO.

Every objective is a weighted sum over the global batch's pairs of a per-pair
loss, plus (RPO, ORPO) a weighted sum of the chosen answers' token NLL:

    L = sum_p v_p * l_p  +  c * sum_p u_p * (-logp_chosen_p)

with l_p the pair's loss, v_p its weight (1/P, or a per-task mean, see
`pair_weights`), u_p = 1/N_c (N_c: chosen answer tokens of the global batch;
per task with task weights) and c = rpo_alpha for RPO, 1 for ORPO, 0 otherwise.
Both terms are sums of per-pair values with weights counted on the host over
the whole global batch, so L and its gradient do not depend on how the pairs
are cut into micro-batches or DP ranks, as for the SFT losses in `multitask`.

The formulas follow TRL 1.16 (trl/trainer/dpo_trainer.py `_compute_loss`,
trl/experimental/cpo and orpo):

    dpo    l = -(1-e) logsig(b D) - e logsig(-b D),  D = (c - c_ref) - (r - r_ref)
           (Rafailov et al. 2023 eq. 7; label smoothing e: Mitchell's conservative DPO)
    rpo    dpo + rpo_alpha x mean chosen token NLL        (Pang et al. 2024 eq. 3)
    orpo   mean chosen token NLL - b logsig(log odds)     (Hong et al. 2024 eq. 6-7),
           log odds = log(p_c/(1-p_c)) - log(p_r/(1-p_r)) on length-averaged log p
    simpo  -(1-e) logsig(b (c/|c| - r/|r|) - g) - e logsig(-(...))   (Meng et al. 2024 eq. 6)

c, r: summed log-probabilities of the chosen and rejected answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("sft", "dpo", "rpo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = ("dpo", "rpo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "rpo")


@dataclass(frozen=True)
class PreferenceSetup:
    """The objective and its coefficients (the `loss.*` config keys)."""

    objective: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 1.0
    simpo_gamma: float = 0.5

    @property
    def nll_coefficient(self) -> float:
        """c in the module docstring: the weight of the chosen answers' token NLL."""
        return {"rpo": self.rpo_alpha, "orpo": 1.0}.get(self.objective, 0.0)


@dataclass
class PairLogps:
    """Per-pair answer log-probabilities, [P] each: sums over the answer tokens."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _smoothed_sigmoid_loss(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def rewards(setup: PreferenceSetup, pairs: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards TRL logs: b x log-ratio (dpo, rpo), b x mean log p (orpo, simpo); no gradient."""
    if setup.objective in NEEDS_REFERENCE:
        chosen, rejected = pairs.chosen - pairs.ref_chosen, pairs.rejected - pairs.ref_rejected
    else:
        chosen, rejected = _averages(pairs)
    return setup.beta * chosen.detach(), setup.beta * rejected.detach()


def _averages(pairs: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return pairs.chosen / pairs.chosen_tokens.clamp(
        min=1
    ), pairs.rejected / pairs.rejected_tokens.clamp(min=1)


def pair_losses(setup: PreferenceSetup, pairs: PairLogps) -> torch.Tensor:
    """l_p of every pair, [P] in float32 or wider (the NLL term of rpo and orpo is separate: `objective`)."""
    pairs = PairLogps(*(None if t is None else _at_least_fp32(t) for t in vars(pairs).values()))
    if setup.objective in NEEDS_REFERENCE:
        if pairs.ref_chosen is None or pairs.ref_rejected is None:
            raise ValueError(f"loss.objective={setup.objective} needs reference log-probabilities")
        delta = (pairs.chosen - pairs.ref_chosen) - (pairs.rejected - pairs.ref_rejected)
        return _smoothed_sigmoid_loss(setup.beta * delta, setup.label_smoothing)
    chosen, rejected = _averages(pairs)
    if setup.objective == "simpo":
        return _smoothed_sigmoid_loss(
            setup.beta * (chosen - rejected) - setup.simpo_gamma, setup.label_smoothing
        )
    if setup.objective == "orpo":
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        return -setup.beta * F.logsigmoid(log_odds)
    raise ValueError(
        f"not a preference objective: {setup.objective!r}; choose from {PREFERENCE_OBJECTIVES}"
    )


def objective(
    setup: PreferenceSetup, pairs: PairLogps, pair_weight: torch.Tensor, nll_weight: torch.Tensor
) -> torch.Tensor:
    """sum_p v_p l_p + c sum_p u_p (-chosen_p): this slice's share of the global-batch objective (scalar)."""
    losses = pair_losses(setup, pairs)
    loss = (losses * pair_weight.to(losses.dtype)).sum()
    if setup.nll_coefficient:
        loss = (
            loss
            + setup.nll_coefficient
            * (-_at_least_fp32(pairs.chosen) * nll_weight.to(losses.dtype)).sum()
        )
    return loss


@dataclass
class PairCounts:
    """Pairs and chosen answer tokens per task over a global batch: float64 [num_tasks] each."""

    pairs: torch.Tensor
    chosen_tokens: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.pairs, self.chosen_tokens])

    @staticmethod
    def from_tensor(flat: torch.Tensor) -> "PairCounts":
        half = flat.numel() // 2
        return PairCounts(flat[:half].clone(), flat[half:].clone())


def count_pairs(task_ids: torch.Tensor, chosen_tokens: torch.Tensor, num_tasks: int) -> PairCounts:
    """Counts of one slice of pairs (add them up, and all-reduce over DP, for a global batch)."""
    zeros = torch.zeros(num_tasks, dtype=torch.float64)
    tasks = task_ids.reshape(-1).long()
    return PairCounts(
        zeros.index_add(0, tasks, torch.ones_like(tasks, dtype=torch.float64)),
        zeros.index_add(0, tasks, chosen_tokens.reshape(-1).double()),
    )


def pair_weights(
    task_ids: torch.Tensor, counts: PairCounts, task_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_p, u_p) of each pair given the global batch's counts, float64 [P] each.

    Without task weights: v = 1/P and u = 1/N_c over the whole global batch (TRL's
    means). With task weights a_t: per-task means combined as the `task_token`
    SFT mode does, v = a_t / (A P_t), u = a_t / (A N_c,t), A = sum of a_t over the
    tasks present.
    """
    tasks = task_ids.reshape(-1).long()
    if task_weights is None:
        v = torch.full(tasks.shape, 1.0 / max(float(counts.pairs.sum()), 1.0), dtype=torch.float64)
        u = torch.full(
            tasks.shape, 1.0 / max(float(counts.chosen_tokens.sum()), 1.0), dtype=torch.float64
        )
        return v, u
    a = task_weights.double() * (counts.pairs > 0)
    share = a[tasks] / a.sum().clamp(min=1e-30)
    return share / counts.pairs.clamp(min=1)[tasks], share / counts.chosen_tokens.clamp(min=1)[
        tasks
    ]


def batch_objective(
    setup: PreferenceSetup,
    pairs: PairLogps,
    task_ids: torch.Tensor | None = None,
    num_tasks: int = 1,
    task_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The objective of a batch of pairs that is its own global batch (no process group)."""
    task_ids = torch.zeros(pairs.chosen.shape, dtype=torch.long) if task_ids is None else task_ids
    counts = count_pairs(task_ids, pairs.chosen_tokens, num_tasks)
    v, u = pair_weights(task_ids, counts, task_weights)
    return objective(setup, pairs, v, u)


def metric_sums(
    setup: PreferenceSetup, pairs: PairLogps, task_ids: torch.Tensor, num_tasks: int
) -> torch.Tensor:
    """Per-task sums of (chosen reward, rejected reward, margin, correct, pairs), float64 [5, num_tasks].

    Sums, so that micro-batches and DP ranks add up; divide by the last row for the means.
    """
    chosen, rejected = rewards(setup, pairs)
    rows = torch.stack(
        [
            chosen,
            rejected,
            chosen - rejected,
            (chosen > rejected).to(chosen.dtype),
            torch.ones_like(chosen),
        ]
    ).double()
    out = torch.zeros(5, num_tasks, dtype=torch.float64, device=rows.device)
    return out.index_add_(1, task_ids.reshape(-1).long().to(rows.device), rows)
