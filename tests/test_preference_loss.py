"""Preference objectives against TRL 1.16's own loss code: loss and gradients.

TRL's trainers are called unbound with a namespace holding only the attributes
their loss code reads, so the formulas and their composition (means, NLL term)
are TRL's: DPOTrainer._compute_loss (dpo, rpo as loss_type ["sigmoid", "sft"]),
CPOTrainer.cpo_loss (simpo; and the conservative sigmoid, applied to DPO's log
ratios, for label smoothing), ORPOTrainer.get_batch_loss_metrics (orpo).
"""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

from megamft.loss.preference import (  # noqa: E402
    PairLogps,
    PreferenceSetup,
    batch_objective,
    count_pairs,
    metric_sums,
    objective,
    pair_weights,
)

PAIRS, LENGTH = 4, 7


def _per_token(seed=0):
    """Per-token log-probs [2P, L-1] (chosen rows first, as TRL concatenates) and the answer mask."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * PAIRS, LENGTH - 1, generator=g, dtype=torch.float64) * 1.5
    mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row in range(2 * PAIRS):
        start = 2 + row % 2
        mask[row, start : start + 2 + (row * 3) % 4] = 1
    return logps.requires_grad_(True), mask


def _pairs(logps, mask, ref=None):
    shift = mask[:, 1:].to(logps.dtype)
    sums, tokens = (logps * shift).sum(1), shift.sum(1)
    refs = (None, None) if ref is None else ref.chunk(2)
    return PairLogps(*sums.chunk(2), *tokens.chunk(2), *refs)


class _TokenLogpModel:
    """Returns given per-token log-probs, zero where the labels are ignored, like TRL's fused LM head."""

    training = True

    def __init__(self, logps):
        self.logps = logps

    def __call__(self, labels, **_):
        learned = (labels[:, 1:] != -100).to(self.logps.dtype)
        zeros = torch.zeros_like(self.logps)
        return SimpleNamespace(
            log_probs=self.logps * learned,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(self.logps, dtype=torch.bool),
        )


def _accelerator():
    return SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)


def _trl_dpo(logps, mask, ref, beta, loss_types, loss_weights):
    model = _TokenLogpModel(logps)
    trainer = SimpleNamespace(
        model=model,
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:PAIRS],
        "ref_rejected_logps": ref[PAIRS:],
    }
    return trl_dpo.DPOTrainer._compute_loss(
        trainer, model, inputs, return_outputs=False
    ), trainer._metrics["train"]


def _grad(loss, leaf):
    return torch.autograd.grad(loss, leaf, retain_graph=True)[0]


def _reference():
    return -torch.linspace(2.0, 5.0, 2 * PAIRS, dtype=torch.float64)


@pytest.mark.parametrize(
    "objective_name,loss_types,weights",
    [
        ("dpo", ["sigmoid"], [1.0]),
        ("rpo", ["sigmoid", "sft"], [1.0, 0.7]),
    ],
)
def test_dpo_and_rpo_match_trl(objective_name, loss_types, weights):
    logps, mask = _per_token()
    ref = _reference()
    expected, metrics = _trl_dpo(logps, mask, ref, 0.3, loss_types, weights)
    setup = PreferenceSetup(objective_name, beta=0.3, rpo_alpha=weights[-1])
    ours = batch_objective(setup, _pairs(logps, mask, ref))
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(_grad(ours, logps), _grad(expected, logps), rtol=1e-10, atol=1e-14)
    sums = metric_sums(setup, _pairs(logps, mask, ref), torch.zeros(PAIRS, dtype=torch.long), 1)[
        :, 0
    ]
    assert [float(v) / PAIRS for v in sums[:4]] == pytest.approx(
        [
            metrics[k][0]
            for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
        ]
    )


def _trl_cpo(chosen, rejected, loss_type, beta, smoothing, gamma=0.0):
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=smoothing,
        simpo_gamma=gamma,
        loss_type=loss_type,
        accelerator=_accelerator(),
    )
    losses, _, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    return losses.mean()


def test_dpo_label_smoothing_matches_trl_conservative_sigmoid():
    """cDPO is CPO's smoothed sigmoid applied to DPO's log ratios (TRL's DPO sigmoid has no smoothing)."""
    logps, mask = _per_token(1)
    ref = _reference()
    pairs = _pairs(logps, mask, ref)
    expected = _trl_cpo(
        pairs.chosen - ref[:PAIRS], pairs.rejected - ref[PAIRS:], "sigmoid", 0.2, 0.1
    )
    ours = batch_objective(PreferenceSetup("dpo", beta=0.2, label_smoothing=0.1), pairs)
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(_grad(ours, logps), _grad(expected, logps), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_simpo_matches_trl_cpo(smoothing):
    logps, mask = _per_token(2)
    pairs = _pairs(logps, mask)
    expected = _trl_cpo(
        pairs.chosen / pairs.chosen_tokens,
        pairs.rejected / pairs.rejected_tokens,
        "simpo",
        2.0,
        smoothing,
        gamma=0.8,
    )
    ours = batch_objective(
        PreferenceSetup("simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=smoothing), pairs
    )
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(_grad(ours, logps), _grad(expected, logps), rtol=1e-10, atol=1e-14)


def test_orpo_matches_trl():
    logps, mask = _per_token(3)
    pairs = _pairs(logps, mask)
    chosen_mask = mask[:PAIRS, 1:].to(logps.dtype)
    nll = (
        -(logps[:PAIRS] * chosen_mask).sum() / chosen_mask.sum()
    )  # TRL's cross-entropy mean over chosen tokens
    forward = (
        pairs.chosen / pairs.chosen_tokens,
        pairs.rejected / pairs.rejected_tokens,
        torch.zeros(1),
        torch.zeros(1),
        nll,
    )
    trainer = SimpleNamespace(
        beta=0.25,
        aux_loss_enabled=False,
        accelerator=_accelerator(),
        concatenated_forward=lambda model, batch: forward,
    )
    trainer.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trainer, c, r)
    expected, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
    setup = PreferenceSetup("orpo", beta=0.25)
    ours = batch_objective(setup, pairs)
    # TRL's odds_ratio_loss computes in float32 (.float()), ours in the inputs' float64: float32 rounding apart
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    torch.testing.assert_close(_grad(ours, logps), _grad(expected, logps), rtol=1e-5, atol=1e-8)
    sums = metric_sums(setup, pairs, torch.zeros(PAIRS, dtype=torch.long), 1)[:, 0]
    assert float(sums[3]) / PAIRS == pytest.approx(metrics["rewards/accuracies"])


def test_dpo_at_policy_equal_reference_is_ln2():
    logps, mask = _per_token(4)
    pairs = _pairs(logps, mask)
    pairs.ref_chosen, pairs.ref_rejected = (
        pairs.chosen.detach().clone(),
        pairs.rejected.detach().clone(),
    )
    assert float(batch_objective(PreferenceSetup("dpo", beta=0.5), pairs).detach()) == math.log(2)


@pytest.mark.parametrize("name", ["dpo", "rpo", "orpo", "simpo"])
def test_any_cut_of_the_pairs_sums_to_the_whole(name):
    """Weights counted over the whole batch make the slices' objectives add up to the batch's, per task too."""
    logps, mask = _per_token(5)
    ref = _reference()
    tasks = torch.tensor([0, 1, 1, 0])
    setup = PreferenceSetup(name, beta=0.4)
    weights = torch.tensor([2.0, 1.0])
    whole = batch_objective(setup, _pairs(logps, mask, ref), tasks, 2, weights)
    counts = count_pairs(tasks, _pairs(logps, mask).chosen_tokens, 2)
    parts = 0.0
    for piece in ([0], [1, 2], [3]):
        rows = piece + [PAIRS + i for i in piece]
        sub = _pairs(logps[rows], mask[rows], ref[rows])
        v, u = pair_weights(tasks[piece], counts, weights)
        parts = parts + objective(setup, sub, v, u)
    assert float(parts.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    torch.testing.assert_close(_grad(parts, logps), _grad(whole, logps), rtol=1e-10, atol=1e-14)
    per_task = [
        batch_objective(
            setup, _pairs(logps[_rows(tasks, t)], mask[_rows(tasks, t)], ref[_rows(tasks, t)])
        )
        for t in (0, 1)
    ]
    assert float(whole.detach()) == pytest.approx(
        (2 * float(per_task[0]) + float(per_task[1])) / 3, rel=1e-12
    )


def _rows(tasks, task):
    picked = [i for i in range(PAIRS) if int(tasks[i]) == task]
    return picked + [PAIRS + i for i in picked]
