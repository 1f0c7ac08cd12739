"""Masked token loss with per-task sums, in megatron's per-token-loss form.

GPTModel computes the per-token cross entropy itself (vocab-parallel under
TP) when it is given labels. This function turns it into what megatron's
schedule expects with ``calculate_per_token_loss=True``: the *sum* of the
micro-batch's learned-token losses and its learned-token count. The schedule
adds the counts over micro-batches and DP ranks and divides the gradients by
the total, so the result is the exact mean over the global batch however it
is cut.
"""

from __future__ import annotations

import torch


def task_sums(values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum of `values` per task id: float64 [num_tasks]."""
    out = torch.zeros(num_tasks, dtype=torch.float64)
    return out.index_add_(0, task_ids.reshape(-1).cpu(), values.reshape(-1).double().cpu())


def masked_token_loss(
    per_token_loss: torch.Tensor, loss_mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
):
    """(loss sum, learned-token count, stats) for one micro-batch.

    stats["task_stats"] holds [per-task loss sums..., per-task token counts...]
    for logging; it carries no gradient.
    """
    mask = loss_mask.to(per_token_loss.dtype)
    masked = per_token_loss.float() * mask.float()
    loss_sum = masked.sum()
    num_tokens = mask.sum().to(torch.int)
    stats = torch.cat(
        [task_sums(masked.detach(), task_ids, num_tasks), task_sums(mask.detach(), task_ids, num_tasks)]
    )
    return loss_sum, num_tokens, {"task_stats": stats}
