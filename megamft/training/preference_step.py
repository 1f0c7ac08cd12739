"""Preference objectives inside megatron's schedule: per-sequence log-probabilities from per-token losses.

A preference micro-batch is an ordinary one (tokens, labels, loss_mask, task_ids,
sample_ids) with two more per-token tensors: `pair_ids` (the pair a token's
document belongs to, numbered within the micro-batch) and `pair_half` (0 chosen,
1 rejected, -1 padding), and `ref_logps`, the reference log-probability of each
pair's halves, [pairs, 2] (zeros where the objective has none). Both halves of a
pair are in the same micro-batch, so the last pipeline stage holds both whole
sequences' per-token losses: a pair's loss is computed there, in megatron's
loss_func, with weights counted on the host over the whole global batch
(megamft.loss.preference), and its gradient flows back through the per-token losses.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megamft.loss.fused_ce import fused_multitask_cross_entropy
from megamft.loss.preference import (
    PairCounts,
    PairLogps,
    PreferenceSetup,
    count_pairs,
    metric_sums,
    objective,
    pair_weights,
)

PAIR_KEYS = ("pair_chosen", "pair_rejected", "pair_tasks", "pair_weight", "nll_weight", "ref_logps")


def pair_samples(
    batch: dict, sample_index: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, ...]:
    """(sample index of each pair's chosen half, of its rejected half, task of each pair) of a micro-batch."""
    index = sample_index.reshape(-1)
    half = torch.full((num_samples,), -1, dtype=torch.long).scatter_(
        0, index, batch["pair_half"].reshape(-1)
    )
    pair = torch.zeros(num_samples, dtype=torch.long).scatter_(
        0, index, batch["pair_ids"].reshape(-1)
    )
    task = torch.zeros(num_samples, dtype=torch.long).scatter_(
        0, index, batch["task_ids"].reshape(-1)
    )
    num_pairs = int(batch["ref_logps"].shape[0])
    chosen, rejected = torch.full((num_pairs,), -1), torch.full((num_pairs,), -1)
    chosen[pair[half == 0]] = torch.nonzero(half == 0).flatten()
    rejected[pair[half == 1]] = torch.nonzero(half == 1).flatten()
    if (chosen < 0).any() or (rejected < 0).any():
        raise ValueError("a preference micro-batch must hold both halves of each of its pairs")
    return chosen, rejected, task[chosen]


def global_pair_counts(micro_batches: list[dict], num_tasks: int) -> PairCounts:
    """Pairs and chosen answer tokens per task over the global batch (all micro-batches, all DP ranks)."""
    flat = torch.zeros(2 * num_tasks, dtype=torch.float64)
    for batch in micro_batches:
        flat += count_pairs(batch["pair_tasks"], batch["chosen_tokens"], num_tasks).as_tensor()
    torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group_gloo())
    return PairCounts.from_tensor(flat)


def prepare_pairs(
    micro_batches: list[dict],
    indices: list[tuple[torch.Tensor, int]],
    num_tasks: int,
    task_weights: torch.Tensor | None,
) -> list[dict]:
    """Each micro-batch with its pairs' sample indices and weights (host side, before the forward pass)."""
    located = []
    for batch, (sample_index, num_samples) in zip(micro_batches, indices):
        chosen, rejected, tasks = pair_samples(
            batch, sample_index.view(batch["loss_mask"].shape), num_samples
        )
        learned = torch.zeros(num_samples, dtype=torch.float64).index_add_(
            0, sample_index.reshape(-1), batch["loss_mask"].reshape(-1).double()
        )
        located.append(
            dict(
                batch,
                pair_chosen=chosen,
                pair_rejected=rejected,
                pair_tasks=tasks,
                chosen_tokens=learned[chosen],
            )
        )
    counts = global_pair_counts(located, num_tasks)
    for batch in located:
        v, u = pair_weights(batch["pair_tasks"], counts, task_weights)
        batch.update(pair_weight=v, nll_weight=u)
        for key in ("pair_ids", "pair_half", "chosen_tokens"):
            batch.pop(key)
    return located


def sequence_logps(per_token_loss: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the learned tokens, learned tokens) of every sample of the micro-batch."""
    mask = batch["loss_mask"].reshape(-1).float()
    index = batch["sample_index"].reshape(-1)
    sums = torch.zeros(batch["num_samples"], dtype=torch.float32, device=mask.device)
    logps = sums.index_add(0, index, -per_token_loss.reshape(-1).float() * mask)
    return logps, sums.index_add(0, index, mask)


def fused_sequence_logps(
    logits: torch.Tensor, batch: dict, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` from this TP rank's vocab shard of the logits: minus the fused cross entropy's
    per-sample sums (no [tokens, vocab] log-softmax is made), whose gradient flows into the logits."""
    mask = batch["loss_mask"].reshape(-1).float()
    index = batch["sample_index"].reshape(-1)
    vocab_local = logits.shape[-1]
    out = fused_multitask_cross_entropy(
        logits.reshape(-1, vocab_local),
        batch["labels"].reshape(-1),
        torch.zeros_like(mask),  # the weighted total is not used: no gradient from it
        mask,
        batch["task_ids"].reshape(-1),
        index,
        num_tasks,
        batch["num_samples"],
        vocab_start=parallel_state.get_tensor_model_parallel_rank() * vocab_local,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        check_ids=False,  # ids were checked on the host
    )
    tokens = torch.zeros(batch["num_samples"], dtype=torch.float32, device=mask.device)
    return -out.sample_sums.float(), tokens.index_add(0, index, mask)


def pair_logps(output: torch.Tensor, batch: dict, num_tasks: int | None = None) -> PairLogps:
    """The pairs' log-probabilities from megatron's per-token losses, or (num_tasks given: fused cross
    entropy) from the vocab-parallel logits."""
    if num_tasks is None:
        logps, tokens = sequence_logps(output, batch)
    else:
        logps, tokens = fused_sequence_logps(output, batch, num_tasks)
    c, r = batch["pair_chosen"], batch["pair_rejected"]
    ref = batch["ref_logps"].float()
    return PairLogps(logps[c], logps[r], tokens[c], tokens[r], ref[:, 0], ref[:, 1])


def preference_loss_func(
    setup: PreferenceSetup,
    total_tokens: float,
    num_tasks: int,
    fused: bool,
    batch: dict,
    output: torch.Tensor,
):
    """megatron's loss_func for a preference micro-batch (see step._loss_func for the K scaling).

    output: per-token losses, or with `fused` (loss.fused_cross_entropy) the vocab-parallel logits.
    Stats: the objective's share, then metric_sums (chosen and rejected rewards, margin, correct, pairs per task).
    """
    pairs = pair_logps(output, batch, num_tasks if fused else None)
    share = objective(setup, pairs, batch["pair_weight"], batch["nll_weight"])
    metrics = metric_sums(setup, pairs, batch["pair_tasks"], num_tasks)
    stats = torch.cat([share.detach().double().reshape(1), metrics.reshape(-1)])
    return share * total_tokens, batch["loss_mask"].sum().to(torch.int), {"preference_stats": stats}


def reference_loss_func(num_tasks: int, fused: bool, batch: dict, output: torch.Tensor):
    """Forward-only loss_func: the pairs' log-probabilities under the model as it is, [pairs, 2]."""
    pairs = pair_logps(output, batch, num_tasks if fused else None)
    logps = torch.stack([pairs.chosen, pairs.rejected], dim=1).detach().double()
    return output.new_zeros(()), batch["loss_mask"].sum().to(torch.int), {"pair_logps": logps}


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def reduce_preference_stats(outputs: list[dict], task_names: tuple[str, ...]) -> tuple[float, dict]:
    """(objective, {metric: {task: mean over the task's pairs}}), the same on every rank."""
    num_tasks = len(task_names)
    stats = torch.zeros(1 + 5 * num_tasks, dtype=torch.float64, device=torch.cuda.current_device())
    for out in outputs:
        stats += out["preference_stats"]
    torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    torch.distributed.broadcast(
        stats,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    values = stats.cpu()
    sums = values[1:].view(5, num_tasks)
    metrics = {
        name: {
            task: float(sums[row, t] / sums[4, t]) if sums[4, t] else float("nan")
            for t, task in enumerate(task_names)
        }
        for row, name in enumerate(METRICS)
    }
    return float(values[0]), metrics
