"""Fused vocab-parallel cross entropy with masked per-task and per-sample sums.

    out = fused_multitask_cross_entropy(logits, labels, token_weights, loss_mask,
                                        task_ids, sample_index, num_tasks, num_samples,
                                        vocab_start=rank * shard, tp_group=group,
                                        check_ids=False)   # ids validated on the host
    out.total.backward()      # gradient written over `logits` (pass logits you own)

logits is this TP rank's [tokens, vocab shard] slice, fp32, bf16 or fp16. On CUDA
the kernels of csrc/fused_ce.cu run (built with ninja, see Build below);
elsewhere the same scheme runs in torch, vocab chunk by vocab chunk. Either way
no fp32 copy of the whole [tokens, vocab] logits is made, and the backward pass
overwrites the logits with their gradient. Gradients flow from the weighted total
and from the per-sample sums (a sequence's summed log-probability is minus its
sum: the preference objectives read them); one backward pass serves both, with
each token's factor grad_total x weight + grad_sample_sums[sample] x mask.

The scheme is megatron's: per shard, each token's max logit, sum of
exp(logit - max) and target logit (when the label is in the shard); across TP,
all-reduce the max, the sum-exp rescaled to that max, and the target; then
loss = log(sum-exp) + max - target.

Checks. Every tensor argument is validated before anything reaches a kernel or
the torch path, raising ValueError naming the argument: on ``logits.device``;
logits float32/bfloat16/float16, 2-D with contiguous rows; labels, task_ids and
sample_index integer, token_weights and loss_mask floating, each 1-D with one
entry per token and contiguous. With ``check_ids=True`` (the default) task_ids
must lie in [0, num_tasks) and sample_index in [0, num_samples); that check
costs one device-to-host sync, so training passes ``check_ids=False`` after
validating the ids on the host. Nothing else in forward or backward syncs. The
kernels bounds-check every id anyway (an out-of-range task or sample id counts
in no sum, a label outside the shard has no target here), and the torch path
does the same, so a wrong id can never touch memory out of range.

Special values. A row whose logits are all -inf gets max -inf, sum-exp 0 and
loss +inf (no NaN); a token with weight 0 (mask 0) contributes exactly 0 to
the total (to its task and sample sums) whatever its loss, and its gradient row
is exactly 0.

Determinism. Same inputs give bitwise the same loss, per-task sums, per-sample
sums and gradient, run after run: the kernels use no floating-point atomics
(fixed-order block reductions; per-task and per-sample sums over a stable sort
of the ids, see csrc/fused_ce.cu), and the torch path is deterministic on the
CPU. Across TP ranks the all-reduces are as deterministic as the backend.

Build. ``kernels()`` returns the extension built by
megamft.loss.fused_ce_build.build_extension (the two csrc sources, the binding's
own torch headers), kept in a folder keyed by the sources and build settings.
Training builds it at start-up, once per node (megamft.training.kernel_startup),
and hands every rank the agreed outcome through ``adopt_kernels``; elsewhere the
first call builds or loads it. Without a CUDA toolkit (nvcc / CUDA_HOME), without
ninja, with a toolkit whose major version differs from ``torch.version.cuda``, or
on any build error it warns once, saying what is missing, and the torch path runs
instead.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from megamft.loss.fused_ce_build import (  # noqa: F401 - the build's names, re-exported
    EXTENSION_NAME,
    SOURCES,
    KernelsNotBuilt,
    ToolkitMissing,
    build_extension,
    failure_reason,
    load_extension,
    source_dir,
    toolkit_problem,
)

log = logging.getLogger(__name__)
_VOCAB_CHUNK = 8192
_kernels = None
_build_failed = False
_notice_shown = False
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def warn_fallback(reason: str) -> None:
    """The one warning (log and RuntimeWarning) that the torch path runs instead of the kernels, and why."""
    message = (
        f"fused cross entropy: the CUDA extension is not available ({reason}); "
        "using the torch path (same results, slower, more memory)"
    )
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernels():
    """The compiled extension where CUDA is available; None elsewhere (torch path).

    Without a start-up decision (adopt_kernels), the first call builds or loads it;
    a missing toolkit, ninja or a build error warns once per process and falls back.
    """
    global _kernels, _build_failed, _notice_shown
    if _kernels is not None:
        return _kernels
    if _build_failed:
        return None
    if not torch.cuda.is_available():
        if not _notice_shown:
            log.info("fused cross entropy: CUDA not available, using the torch path")
            _notice_shown = True
        return None
    try:
        _kernels = build_extension()
    except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch
        _build_failed = True
        warn_fallback(failure_reason(exc))
    return _kernels


def adopt_kernels(module) -> None:
    """Use `module` from now on in this process, or with None the torch path, without building.

    Training's start-up calls it with what every rank agreed on (it has warned already).
    """
    global _kernels, _build_failed
    _kernels, _build_failed = module, module is None


@dataclass
class RowStats:
    """Per token: max logit, sum of exp(logit - max), target logit. float32 [tokens] each."""

    row_max: torch.Tensor
    row_sumexp: torch.Tensor
    row_target: torch.Tensor


def _finite_or_zero(row_max: torch.Tensor) -> torch.Tensor:
    """row_max with -inf replaced by 0: the shift for exp() of a row of only -inf (exp(-inf) = 0, not NaN)."""
    return torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)


def shard_stats_torch(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int) -> RowStats:
    """RowStats of one vocab shard, reading it in chunks (no full-size fp32 copy)."""
    tokens, vocab = logits.shape
    row_max = torch.full((tokens,), float("-inf"), device=logits.device)
    row_sumexp = torch.zeros(tokens, device=logits.device)
    for start in range(0, vocab, _VOCAB_CHUNK):
        chunk = logits[:, start : start + _VOCAB_CHUNK].float()
        new_max = torch.maximum(row_max, chunk.max(dim=1).values)
        shift = _finite_or_zero(new_max)
        row_sumexp = row_sumexp * torch.exp(row_max - shift) + torch.exp(
            chunk - shift[:, None]
        ).sum(dim=1)
        row_max = new_max
    local = labels - vocab_start
    inside = (local >= 0) & (local < vocab)
    picked = logits.gather(1, local.clamp(0, vocab - 1)[:, None]).squeeze(1).float()
    return RowStats(row_max, row_sumexp, torch.where(inside, picked, torch.zeros_like(picked)))


Reduce = Callable[[torch.Tensor], torch.Tensor]


def combine(stats: RowStats, reduce_max: Reduce, reduce_sum: Reduce) -> RowStats:
    """Merge shard statistics across TP ranks (the reducers all-reduce, or fold a list in tests)."""
    global_max = reduce_max(stats.row_max.clone())
    sumexp = reduce_sum(stats.row_sumexp * torch.exp(stats.row_max - _finite_or_zero(global_max)))
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


def _segment_sums(values: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """sum of values per id in [0, count); ids out of range count nowhere (no sync, no bad index)."""
    sums = torch.zeros(count, dtype=torch.float64, device=values.device)
    if count == 0:
        return sums
    inside = (ids >= 0) & (ids < count)
    return sums.index_add_(
        0,
        torch.where(inside, ids, torch.zeros_like(ids)),
        torch.where(inside, values, torch.zeros_like(values)),
    )


def finalize_torch(stats: RowStats, weights, mask, task_ids, sample_index, num_tasks, num_samples):
    """(per-token loss, per-task masked sums, per-sample masked sums, weighted total)."""
    per_token = torch.log(stats.row_sumexp) + stats.row_max - stats.row_target
    per_token = torch.where(
        torch.isneginf(stats.row_max), torch.full_like(per_token, float("inf")), per_token
    )
    # weight 0 / mask 0 contributes exactly 0, even where the loss is inf or NaN
    masked = torch.where(mask != 0, per_token * mask, torch.zeros_like(per_token)).double()
    weighted = per_token.double() * weights.double()
    weighted = torch.where(weights != 0, weighted, torch.zeros_like(weighted))
    return (
        per_token,
        _segment_sums(masked, task_ids, num_tasks),
        _segment_sums(masked, sample_index, num_samples),
        weighted.sum(),
    )


def backward_inplace_torch(
    logits, labels, vocab_start: int, stats: RowStats, scaled_weights
) -> None:
    """Overwrite logits with (softmax - onehot) * weight, chunk by chunk, without a host sync."""
    vocab = logits.shape[1]
    local = labels - vocab_start
    shift = _finite_or_zero(stats.row_max)[:, None]
    sumexp = stats.row_sumexp
    sumexp = torch.where(sumexp > 0, sumexp, torch.ones_like(sumexp))[
        :, None
    ]  # a row of only -inf: p = 0
    weight = scaled_weights[:, None]
    ignored = (scaled_weights == 0)[:, None]
    for start in range(0, vocab, _VOCAB_CHUNK):
        chunk = logits[:, start : start + _VOCAB_CHUNK]
        width = chunk.shape[1]
        grad = torch.exp(chunk.float() - shift) / sumexp
        hit = ((local >= start) & (local < start + width))[:, None]
        column = (local - start).clamp(0, width - 1)[:, None]
        picked = grad.gather(1, column)
        grad.scatter_(
            1, column, torch.where(hit, picked - 1.0, picked)
        )  # one column per row: deterministic
        grad.mul_(weight).masked_fill_(ignored, 0.0)  # weight 0: an exact 0 row
        chunk.copy_(grad)


def gradient_factor(
    weights: torch.Tensor,
    grad_total: torch.Tensor | None,
    mask: torch.Tensor,
    sample_index: torch.Tensor,
    grad_sample_sums: torch.Tensor | None,
) -> torch.Tensor:
    """Each token's factor of (softmax - onehot) in the gradient, float32 [tokens], on the device (no sync).

    d total / d loss_i = w_i and d sample_sums[s] / d loss_i = mask_i for the tokens of sample s, so
    the factor is grad_total w_i + grad_sample_sums[s_i] mask_i; a token with mask 0, or a sample
    index out of range (counted in no sum), gets no sample term. None: that output was not used.
    """
    factor = weights * grad_total.float() if grad_total is not None else torch.zeros_like(weights)
    if grad_sample_sums is not None and grad_sample_sums.numel():
        count = grad_sample_sums.shape[0]
        inside = (sample_index >= 0) & (sample_index < count) & (mask != 0)
        picked = grad_sample_sums.float()[sample_index.clamp(0, count - 1)] * mask
        factor = factor + torch.where(inside, picked, torch.zeros_like(picked))
    return factor.contiguous()


def _use_kernels(logits: torch.Tensor):
    return kernels() if logits.device.type == "cuda" and torch.cuda.is_available() else None


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        weights,
        mask,
        task_ids,
        sample_index,
        num_tasks,
        num_samples,
        vocab_start,
        group,
    ):
        impl = _use_kernels(logits)
        if impl is not None:
            stats = RowStats(*impl.shard_stats(logits, labels, vocab_start))
        else:
            stats = shard_stats_torch(logits, labels, vocab_start)
        stats = combine(stats, *tp_reducers(group))
        args = (weights.float(), mask.float(), task_ids, sample_index)
        if impl is not None:
            per_token, task_sums, sample_sums, total = impl.finalize(
                stats.row_max, stats.row_sumexp, stats.row_target, *args, num_tasks, num_samples
            )
        else:
            per_token, task_sums, sample_sums, total = finalize_torch(
                stats, *args, num_tasks, num_samples
            )
        ctx.save_for_backward(
            logits,
            labels,
            stats.row_max,
            stats.row_sumexp,
            weights.float(),
            mask.float(),
            sample_index,
        )
        ctx.vocab_start = vocab_start
        ctx.mark_non_differentiable(per_token, task_sums)
        ctx.set_materialize_grads(
            False
        )  # an unused output's gradient arrives as None: no work for it
        return total.float(), per_token, task_sums, sample_sums

    @staticmethod
    def backward(ctx, grad_total, grad_per_token, grad_task_sums, grad_sample_sums):
        logits, labels, row_max, row_sumexp, weights, mask, sample_index = ctx.saved_tensors
        scaled = gradient_factor(weights, grad_total, mask, sample_index, grad_sample_sums)
        impl = _use_kernels(logits)
        if impl is not None:
            impl.backward_inplace(logits, labels, ctx.vocab_start, row_max, row_sumexp, scaled)
        else:
            backward_inplace_torch(
                logits, labels, ctx.vocab_start, RowStats(row_max, row_sumexp, None), scaled
            )
        return logits, None, None, None, None, None, None, None, None, None


@dataclass
class FusedOutput:
    total: torch.Tensor  # sum_i w_i * loss_i, differentiable
    per_token_loss: torch.Tensor  # [tokens]
    task_sums: torch.Tensor  # [num_tasks] sum of mask * loss
    sample_sums: torch.Tensor  # [num_samples] sum of mask * loss, differentiable (float64)


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _validate(
    logits,
    labels,
    token_weights,
    loss_mask,
    task_ids,
    sample_index,
    num_tasks,
    num_samples,
    vocab_start,
    check_ids: bool,
) -> None:
    """Raise ValueError naming the first bad argument (see the module docstring)."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(
            f"logits must be [tokens, vocab shard] with vocab >= 1, got shape {tuple(logits.shape)}"
        )
    tokens, vocab = logits.shape
    if (vocab > 1 and logits.stride(1) != 1) or (tokens > 1 and logits.stride(0) < vocab):
        raise ValueError(
            f"logits must have contiguous, non-overlapping rows, got strides {logits.stride()}"
        )
    device = logits.device
    for name, tensor, kind in (
        ("labels", labels, "integer"),
        ("token_weights", token_weights, "floating"),
        ("loss_mask", loss_mask, "floating"),
        ("task_ids", task_ids, "integer"),
        ("sample_index", sample_index, "integer"),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on the logits' device {device}, got {tensor.device}")
        if kind == "integer" and not _is_integer(tensor.dtype):
            raise ValueError(f"{name} must have an integer dtype, got {tensor.dtype}")
        if kind == "floating" and not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must have a floating dtype, got {tensor.dtype}")
        if tensor.dim() != 1 or tensor.shape[0] != tokens:
            raise ValueError(
                f"{name} must be 1-D with one entry per token ({tokens}), got shape {tuple(tensor.shape)}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_count("num_tasks", num_tasks)
    _check_count("num_samples", num_samples)
    _check_count("vocab_start", vocab_start)
    if check_ids and tokens > 0:
        # one device-to-host sync for both ranges
        lo_task, hi_task, lo_sample, hi_sample = torch.stack(
            [
                task_ids.min().long(),
                task_ids.max().long(),
                sample_index.min().long(),
                sample_index.max().long(),
            ]
        ).tolist()
        if lo_task < 0 or hi_task >= num_tasks:
            raise ValueError(
                f"task_ids must lie in [0, num_tasks={num_tasks}), got values in [{lo_task}, {hi_task}]"
            )
        if lo_sample < 0 or hi_sample >= num_samples:
            raise ValueError(
                f"sample_index must lie in [0, num_samples={num_samples}), "
                f"got values in [{lo_sample}, {hi_sample}]"
            )


def fused_multitask_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    loss_mask: torch.Tensor,
    task_ids: torch.Tensor,
    sample_index: torch.Tensor,
    num_tasks: int,
    num_samples: int,
    vocab_start: int = 0,
    tp_group=None,
    check_ids: bool = True,
) -> FusedOutput:
    """Cross entropy over a [tokens, vocab shard] slice with weighted total and segmented sums.

    All tensors must be on ``logits.device`` (ValueError otherwise, see the module docstring).
    ``check_ids=False`` skips the one-sync range check of task_ids / sample_index.
    """
    _validate(
        logits,
        labels,
        token_weights,
        loss_mask,
        task_ids,
        sample_index,
        num_tasks,
        num_samples,
        vocab_start,
        check_ids,
    )
    total, per_token, task_sums, sample_sums = _FusedCrossEntropy.apply(
        logits,
        labels.long(),
        token_weights,
        loss_mask,
        task_ids.long(),
        sample_index.long(),
        num_tasks,
        num_samples,
        vocab_start,
        tp_group,
    )
    return FusedOutput(total, per_token, task_sums, sample_sums)
