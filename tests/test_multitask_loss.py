"""Loss modes against hand-computed values, MFTCoder's formulas, and split invariance (pure torch)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megamft.loss.balancers import FAMO, CoBa, FocalTaskWeights
from megamft.loss.multitask import (
    BatchCounts,
    count,
    effective_task_weights,
    multitask_loss,
    structural_mode,
    token_weights,
    weigh_token_losses,
)

# Two rows, three samples: row 0 packs sample A (task 0, tokens 1, 2) and sample B
# (task 1, token 3; token 4 unlearned); row 1 is sample C (task 1, tokens 6, 7, 8).
LOSSES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
TASKS = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
SAMPLES = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])


def _loss(mode, **kw):
    return float(weigh_token_losses(LOSSES, MASK, TASKS, 2, mode, SAMPLES, **kw).loss)


def test_static_modes_by_hand():
    assert _loss("token") == pytest.approx((1 + 2 + 3 + 6 + 7 + 8) / 6)
    assert _loss("sample") == pytest.approx((1.5 + 3 + 7) / 3)
    assert _loss("task_token") == pytest.approx((1.5 + (3 + 6 + 7 + 8) / 4) / 2)
    assert _loss("task_sample") == pytest.approx((1.5 + (3 + 7) / 2) / 2)
    weights = torch.tensor([3.0, 1.0])
    assert _loss("task_token", task_weights=weights) == pytest.approx((3 * 1.5 + 1 * 6) / 4)
    assert _loss("task_sample", task_weights=weights) == pytest.approx((3 * 1.5 + 1 * 5) / 4)


def test_focal_by_hand():
    gamma = 2.0
    f = lambda mean: (1 - math.exp(-mean)) ** gamma  # noqa: E731
    balancer = FocalTaskWeights(2, gamma)
    balancer.after_train_step(1, torch.tensor([0.5, 2.0]))  # task factors from the previous step
    task_factor = [f(0.5), f(2.0)]
    per_task = [1.5 * f(1.5), (3 * f(3.0) + 7 * f(7.0)) / 2]
    expected = sum(a * loss for a, loss in zip(task_factor, per_task)) / sum(task_factor)
    assert _loss("focal", balancer=balancer, focal_gamma=gamma) == pytest.approx(expected)


def test_absent_tasks_do_not_dilute_the_mean():
    tasks = torch.zeros_like(TASKS)  # everything is task 0 of three tasks
    out = weigh_token_losses(LOSSES, MASK, tasks, 3, "task_token", SAMPLES)
    assert float(out.loss) == pytest.approx(27 / 6)
    assert math.isnan(out.task_loss[1]) and out.task_tokens.tolist() == [6.0, 0.0, 0.0]


def test_multitask_loss_uses_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 4))
    out = multitask_loss(logits, labels, MASK, TASKS, 2, "token", SAMPLES)
    reference = (
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none") * MASK.flatten()
    ).sum() / 6
    torch.testing.assert_close(out.loss, reference)
    out.loss.backward()
    assert logits.grad[0, 3].abs().sum() == 0  # unlearned token: no gradient


def _mftcoder_case(losses, mask, task_of_row, mode, weights):
    """MFTCoder's published per-batch formulas (one sample per row), written out with loops."""
    rows = range(losses.shape[0])
    sample_mean = [float((losses[r] * mask[r]).sum() / mask[r].sum()) for r in rows]
    if mode == "token":
        return float((losses * mask).sum() / mask.sum())
    if mode == "sample":
        return sum(sample_mean) / len(sample_mean)
    total, weight_sum = 0.0, 0.0
    for task in sorted(set(task_of_row)):
        mine = [r for r in rows if task_of_row[r] == task]
        if mode == "task_token":
            value = sum(float((losses[r] * mask[r]).sum()) for r in mine) / sum(
                float(mask[r].sum()) for r in mine
            )
        else:
            value = sum(sample_mean[r] for r in mine) / len(mine)
        total += weights[task] * value
        weight_sum += weights[task]
    return total / weight_sum


@pytest.mark.parametrize("mode", ["token", "sample", "task_token", "task_sample"])
def test_modes_equal_mftcoder_formulas_on_a_fixed_batch(mode):
    torch.manual_seed(3)
    losses = torch.rand(6, 10) * 5
    mask = (torch.rand(6, 10) > 0.3).float()
    mask[:, 0] = 1
    task_of_row = [0, 2, 1, 0, 2, 2]
    tasks = torch.tensor(task_of_row).unsqueeze(1).expand(6, 10)
    weights = torch.tensor([1.0, 2.0, 0.5])
    ours = float(weigh_token_losses(losses, mask, tasks, 3, mode, task_weights=weights).loss)
    assert ours == pytest.approx(
        _mftcoder_case(losses, mask, task_of_row, mode, weights.tolist()), rel=1e-6
    )


def _packed_batch(rows=8, seq=24, tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    task_ids = torch.zeros(rows, seq, dtype=torch.long)
    sample_ids = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randperm(seq - 2, generator=g)[:2].add(1).tolist())
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq])):
            sample_ids[r, a:b] = doc
            task_ids[r, a:b] = int(torch.randint(0, tasks, (1,), generator=g))
    mask = (torch.rand(rows, seq, generator=g) > 0.4).float()
    return mask, task_ids, sample_ids


@pytest.mark.parametrize(
    "mode", ["token", "sample", "task_token", "task_sample", "focal", "coba", "famo"]
)
def test_split_invariance_with_packed_multitask_rows(mode):
    """Summing micro-batch losses weighted with global counts equals the whole-batch loss, grads too."""
    mask, task_ids, sample_ids = _packed_batch()
    torch.manual_seed(1)
    per_token = (torch.rand(mask.shape) * 4).requires_grad_()
    static = torch.tensor([1.0, 2.0, 0.5])
    balancer = {"focal": FocalTaskWeights(3, 2.0), "coba": CoBa(3), "famo": FAMO(3)}.get(mode)
    if balancer is not None:
        balancer.after_train_step(1, torch.tensor([1.0, 2.0, 3.0]))
        balancer.after_train_step(2, torch.tensor([0.5, 1.9, 2.0]))
    whole = weigh_token_losses(
        per_token, mask, task_ids, 3, mode, sample_ids, static, balancer=balancer
    ).loss
    (grad_whole,) = torch.autograd.grad(whole, per_token)
    counts = count(mask, task_ids, sample_ids, 3)  # the global batch's counts
    weights = effective_task_weights(mode, 3, static, balancer)
    for size in (1, 2, 4):
        parts = 0.0
        for start in range(0, 8, size):
            rows = slice(start, start + size)
            factor = None
            if mode == "focal":
                from megamft.loss.multitask import focal_sample_factor, sample_index

                factor = focal_sample_factor(
                    per_token[rows],
                    mask[rows],
                    *sample_index(sample_ids[rows], mask[rows].shape),
                    2.0,
                )
            w = token_weights(
                structural_mode(mode),
                mask[rows],
                task_ids[rows],
                sample_ids[rows],
                counts,
                weights,
                factor,
            )
            parts = parts + (per_token[rows] * w.float()).sum()
        (grad_parts,) = torch.autograd.grad(parts, per_token)
        torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_parts, grad_whole, rtol=1e-6, atol=1e-9)


def test_counts_add_up_over_parts():
    mask, task_ids, sample_ids = _packed_batch()
    whole = count(mask, task_ids, sample_ids, 3)
    halves = count(mask[:4], task_ids[:4], sample_ids[:4], 3) + count(
        mask[4:], task_ids[4:], sample_ids[4:], 3
    )
    assert torch.equal(whole.as_tensor(), halves.as_tensor())
    assert torch.equal(BatchCounts.from_tensor(whole.as_tensor()).task_samples, whole.task_samples)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown loss mode 'case5'"):
        weigh_token_losses(LOSSES, MASK, TASKS, 2, "case5")


def test_context_parallel_split_keeps_every_mode_exact():
    """CP=2: weights computed on whole sequences, each rank keeping half the tokens, sum to the CP=1 objective."""
    import jobs

    from megamft.testing.distributed import launch

    modes = ("token", "sample", "task_token", "task_sample")
    whole = launch(
        jobs.context_parallel_objective,
        1,
        timeout=240,
        kwargs={"context_parallel": 1, "modes": modes},
    )[0]
    split = launch(
        jobs.context_parallel_objective,
        2,
        timeout=240,
        kwargs={"context_parallel": 2, "modes": modes},
    )
    for rank in split:
        assert rank["local_tokens"] * 2 == whole["local_tokens"]
        for mode in modes:
            assert abs(rank[mode] - whole[mode]) <= 1e-12 * abs(whole[mode]), (mode, rank, whole)
