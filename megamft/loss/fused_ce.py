"""Fused vocab-parallel cross entropy with masked per-task and per-sample sums.

    out = fused_multitask_cross_entropy(logits, labels, token_weights, loss_mask,
                                        task_ids, sample_index, num_tasks, num_samples,
                                        vocab_start=rank * shard, tp_group=group)
    out.total.backward()      # gradient written over `logits` (pass logits you own)

logits is this TP rank's [tokens, vocab shard] slice, bf16 or fp32. On CUDA the
kernels of csrc/fused_ce.cu run (built just in time with ninja on first use and
cached by torch); elsewhere the same scheme runs in torch, vocab chunk by vocab
chunk. Either way no fp32 copy of the whole [tokens, vocab] logits is made, and
the backward pass overwrites the logits with their gradient.

The scheme is megatron's: per shard, each token's max logit, sum of
exp(logit - max) and target logit (when the label is in the shard); across TP,
all-reduce the max, the sum-exp rescaled to that max, and the target; then
loss = log(sum-exp) + max - target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files
from typing import Callable

import torch

log = logging.getLogger(__name__)
_VOCAB_CHUNK = 8192
_kernels = None
_notice_shown = False


def kernels():
    """The compiled extension where CUDA is available (None elsewhere, with a one-line notice)."""
    global _kernels, _notice_shown
    if _kernels is not None:
        return _kernels
    if not torch.cuda.is_available():
        if not _notice_shown:
            log.info("fused cross entropy: CUDA not available, using the torch path")
            _notice_shown = True
        return None
    from torch.utils.cpp_extension import load

    sources = files("megamft._csrc")
    _kernels = load(
        name="megamft_fused_ce",
        sources=[str(sources / "fused_ce.cu"), str(sources / "fused_ce_binding.cpp")],
        extra_cuda_cflags=["-O3"],
    )
    return _kernels


@dataclass
class RowStats:
    """Per token: max logit, sum of exp(logit - max), target logit. float32 [tokens] each."""

    row_max: torch.Tensor
    row_sumexp: torch.Tensor
    row_target: torch.Tensor


def shard_stats_torch(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int) -> RowStats:
    """RowStats of one vocab shard, reading it in chunks (no full-size fp32 copy)."""
    tokens, vocab = logits.shape
    row_max = torch.full((tokens,), float("-inf"), device=logits.device)
    row_sumexp = torch.zeros(tokens, device=logits.device)
    for start in range(0, vocab, _VOCAB_CHUNK):
        chunk = logits[:, start:start + _VOCAB_CHUNK].float()
        new_max = torch.maximum(row_max, chunk.max(dim=1).values)
        row_sumexp = row_sumexp * torch.exp(row_max - new_max) + torch.exp(chunk - new_max[:, None]).sum(dim=1)
        row_max = new_max
    local = labels - vocab_start
    inside = (local >= 0) & (local < vocab)
    picked = logits.gather(1, local.clamp(0, vocab - 1)[:, None]).squeeze(1).float()
    return RowStats(row_max, row_sumexp, torch.where(inside, picked, torch.zeros_like(picked)))


Reduce = Callable[[torch.Tensor], torch.Tensor]


def combine(stats: RowStats, reduce_max: Reduce, reduce_sum: Reduce) -> RowStats:
    """Merge shard statistics across TP ranks (the reducers all-reduce, or fold a list in tests)."""
    global_max = reduce_max(stats.row_max.clone())
    sumexp = reduce_sum(stats.row_sumexp * torch.exp(stats.row_max - global_max))
    return RowStats(global_max, sumexp, reduce_sum(stats.row_target.clone()))


def tp_reducers(group) -> tuple[Reduce, Reduce]:
    """All-reduce MAX and SUM over a TP group; identity without one."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return (lambda t: t), (lambda t: t)

    def reducer(op):
        def reduce(tensor):
            torch.distributed.all_reduce(tensor, op=op, group=group)
            return tensor
        return reduce

    return reducer(torch.distributed.ReduceOp.MAX), reducer(torch.distributed.ReduceOp.SUM)


def finalize_torch(stats: RowStats, weights, mask, task_ids, sample_index, num_tasks, num_samples):
    """(per-token loss, per-task masked sums, per-sample masked sums, weighted total)."""
    per_token = torch.log(stats.row_sumexp) + stats.row_max - stats.row_target
    masked = (per_token * mask).double()
    task_sums = torch.zeros(num_tasks, dtype=torch.float64, device=per_token.device).index_add_(0, task_ids, masked)
    sample_sums = torch.zeros(num_samples, dtype=torch.float64, device=per_token.device).index_add_(
        0, sample_index, masked)
    return per_token, task_sums, sample_sums, (per_token.double() * weights.double()).sum()


def backward_inplace_torch(logits, labels, vocab_start: int, stats: RowStats, scaled_weights) -> None:
    """Overwrite logits with (softmax - onehot) * weight, chunk by chunk."""
    vocab = logits.shape[1]
    local = labels - vocab_start
    for start in range(0, vocab, _VOCAB_CHUNK):
        chunk = logits[:, start:start + _VOCAB_CHUNK]
        grad = torch.exp(chunk.float() - stats.row_max[:, None]) / stats.row_sumexp[:, None]
        hit = (local >= start) & (local < start + chunk.shape[1])
        rows = hit.nonzero().squeeze(1)
        grad[rows, local[rows] - start] -= 1.0
        chunk.copy_(grad * scaled_weights[:, None])


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weights, mask, task_ids, sample_index, num_tasks, num_samples,
                vocab_start, group):
        impl = kernels() if logits.is_cuda else None
        if impl is not None:
            stats = RowStats(*impl.shard_stats(logits, labels, vocab_start))
        else:
            stats = shard_stats_torch(logits, labels, vocab_start)
        stats = combine(stats, *tp_reducers(group))
        args = (weights.float(), mask.float(), task_ids, sample_index)
        if impl is not None:
            per_token, task_sums, sample_sums, total = impl.finalize(
                stats.row_max, stats.row_sumexp, stats.row_target, *args, num_tasks, num_samples)
        else:
            per_token, task_sums, sample_sums, total = finalize_torch(stats, *args, num_tasks, num_samples)
        ctx.save_for_backward(logits, labels, stats.row_max, stats.row_sumexp, weights.float())
        ctx.vocab_start = vocab_start
        ctx.mark_non_differentiable(per_token, task_sums, sample_sums)
        return total.float(), per_token, task_sums, sample_sums

    @staticmethod
    def backward(ctx, grad_total, *unused):
        logits, labels, row_max, row_sumexp, weights = ctx.saved_tensors
        scaled = weights * grad_total.float()  # on device: no host sync
        impl = kernels() if logits.is_cuda else None
        if impl is not None:
            impl.backward_inplace(logits, labels, ctx.vocab_start, row_max, row_sumexp, scaled)
        else:
            backward_inplace_torch(logits, labels, ctx.vocab_start, RowStats(row_max, row_sumexp, None), scaled)
        return logits, None, None, None, None, None, None, None, None, None


@dataclass
class FusedOutput:
    total: torch.Tensor            # sum_i w_i * loss_i, differentiable
    per_token_loss: torch.Tensor   # [tokens]
    task_sums: torch.Tensor        # [num_tasks] sum of mask * loss
    sample_sums: torch.Tensor      # [num_samples] sum of mask * loss


def fused_multitask_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor, loss_mask: torch.Tensor,
    task_ids: torch.Tensor, sample_index: torch.Tensor, num_tasks: int, num_samples: int,
    vocab_start: int = 0, tp_group=None,
) -> FusedOutput:
    """Cross entropy over a [tokens, vocab shard] slice with weighted total and segmented sums."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [tokens, vocab shard] with contiguous rows")
    total, per_token, task_sums, sample_sums = _FusedCrossEntropy.apply(
        logits, labels.long(), token_weights, loss_mask, task_ids.long(), sample_index.long(),
        num_tasks, num_samples, vocab_start, tp_group)
    return FusedOutput(total, per_token, task_sums, sample_sums)
