"""One optimizer step and one evaluation pass through megatron's schedules."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megamft.loss.fused_ce import fused_multitask_cross_entropy
from megamft.loss.multitask import (
    BatchCounts,
    count,
    focal_sample_factor,
    sample_keys,
    structural_mode,
    task_sums,
    token_weights,
)


@dataclass
class LossSetup:
    """What every micro-batch of one step needs to weigh its tokens."""

    mode: str = "token"
    normalization: str = "global_batch"
    task_weights: torch.Tensor | None = None  # effective weights for this step (static x dynamic)
    focal_gamma: float = 2.0
    fused: bool = False  # megamft's fused cross entropy on the model's vocab-parallel logits


@dataclass
class StepStats:
    """Global-batch metrics, identical on every rank after `reduce_stats`."""

    loss: float                       # the objective: sum over the global batch of w_i * l_i
    tokens: int
    task_loss: dict[str, float]       # mean token loss per task
    task_tokens: dict[str, int]
    task_weights: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    lr: float | None = None
    skipped: bool = False


def _dp_group():
    """Ranks whose token sums add up to the global batch's: DP x CP (CP ranks hold sequence parts)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def global_counts(micro_batches: list[dict], num_tasks: int) -> BatchCounts:
    """Token and sample counts of the whole global batch (all micro-batches, all DP ranks).

    Counted on whole sequences, before any context-parallel split, so over DP ranks only.
    """
    local = BatchCounts.zeros(num_tasks)
    for batch in micro_batches:
        local = local + count(batch["loss_mask"], batch["task_ids"], batch.get("sample_ids"), num_tasks)
    flat = local.as_tensor()
    torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    return BatchCounts.from_tensor(flat)


_CP_SPLIT_KEYS = ("tokens", "labels", "loss_mask", "task_ids", "sample_ids", "position_ids", "token_weights")


def split_for_context_parallel(micro_batches: list[dict], setup: LossSetup, counts: BatchCounts,
                               num_tasks: int) -> list[dict]:
    """CP > 1: weigh every token on the whole sequence, then keep this CP rank's share.

    Token weights need whole samples (sample and task counts), so they are
    computed before megatron's load-balanced split (chunks r and 2CP-1-r).
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() == 1:
        return micro_batches
    split = []
    for batch in micro_batches:
        whole = {**batch, "token_weights": _token_weights(setup, counts, batch, num_tasks).view_as(batch["loss_mask"])}
        split.append(get_batch_on_this_cp_rank({k: whole[k] for k in _CP_SPLIT_KEYS if k in whole}))
    return split


def _token_weights(setup: LossSetup, counts: BatchCounts, batch: dict, num_tasks: int,
                   factor: torch.Tensor | None = None) -> torch.Tensor:
    """w_i of every token of a micro-batch, for the structural part of the loss mode."""
    if "token_weights" in batch:  # computed before a context-parallel split
        return batch["token_weights"]
    mask, tasks, samples = batch["loss_mask"], batch["task_ids"], batch.get("sample_ids")
    if setup.normalization == "per_microbatch":
        counts = count(mask, tasks, samples, num_tasks)
    weights = setup.task_weights if setup.task_weights is not None else torch.ones(num_tasks)
    return token_weights(structural_mode(setup.mode), mask, tasks, samples, counts, weights, factor)


def _fused_objective(logits: torch.Tensor, batch: dict, w: torch.Tensor, num_tasks: int):
    """(sum of w x loss, per-token loss) from this TP rank's vocab shard of the logits."""
    mask, samples = batch["loss_mask"], batch.get("sample_ids")
    vocab_local = logits.shape[-1]
    _, sample_index = torch.unique(sample_keys(samples, mask.shape), return_inverse=True)
    out = fused_multitask_cross_entropy(
        logits.reshape(-1, vocab_local), batch["labels"].reshape(-1), w.reshape(-1).float().to(logits.device),
        mask.reshape(-1), batch["task_ids"].reshape(-1), sample_index, num_tasks, int(sample_index.max()) + 1,
        vocab_start=parallel_state.get_tensor_model_parallel_rank() * vocab_local,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
    )
    return out.total, out.per_token_loss.view_as(mask)


def _loss_func(setup: LossSetup, counts: BatchCounts, divisor: float, num_tasks: int, batch: dict,
               output: torch.Tensor):
    """megatron's loss_func: (K x this micro-batch's share of the objective, learned tokens, stats).

    megatron divides the gradients by the sum of the returned token counts, K,
    over all micro-batches and DP ranks, so multiplying by K leaves exactly the
    objective's gradient.
    """
    mask, tasks, samples = batch["loss_mask"], batch["task_ids"], batch.get("sample_ids")
    if setup.fused:  # output: vocab-parallel logits
        w = _token_weights(setup, counts, batch, num_tasks)
        objective, per_token_loss = _fused_objective(output, batch, w, num_tasks)
    else:  # output: megatron's per-token cross entropy
        per_token_loss = output
        factor = None
        if setup.mode == "focal":
            factor = focal_sample_factor(per_token_loss, mask, samples, setup.focal_gamma)
        w = _token_weights(setup, counts, batch, num_tasks, factor)
        objective = (per_token_loss.float() * w.to(device=per_token_loss.device, dtype=torch.float32)).sum()
    objective = objective / divisor
    total_tokens = float(counts.task_tokens.sum())
    masked = per_token_loss.detach().float() * mask.float()
    stats = torch.cat([objective.detach().double().reshape(1).cpu(),
                       task_sums(masked, tasks, num_tasks), task_sums(mask.detach(), tasks, num_tasks)])
    return objective * total_tokens, mask.sum().to(torch.int), {"task_stats": stats}


def _on_device(batch: dict) -> dict:
    """The micro-batch on the model's device (a no-op under the CPU emulation)."""
    device = torch.cuda.current_device()
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    packed = batch.get("packed_seq_params")
    if packed is not None:
        moved["packed_seq_params"] = dataclasses.replace(
            packed, cu_seqlens_q=packed.cu_seqlens_q.to(device), cu_seqlens_kv=packed.cu_seqlens_kv.to(device))
    return moved


def _forward_step(make_loss_func, fused: bool, data_iterator, model):
    """megatron's forward_step_func: run one micro-batch, return output and loss_func."""
    batch = _on_device(next(data_iterator))
    labels = None if fused else batch["labels"]  # without labels the last stage returns logits
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=labels,
                   packed_seq_params=batch.get("packed_seq_params"))
    return output, make_loss_func(batch)


def _run_schedule(chunks, micro_batches: list[dict], setup: LossSetup, num_tasks: int, forward_only: bool):
    counts = global_counts(micro_batches, num_tasks)
    divisor = 1.0
    if setup.normalization == "per_microbatch":  # MFTCoder: mean over micro-batches and DP ranks
        divisor = float(len(micro_batches) * parallel_state.get_data_parallel_world_size())
    micro_batch_size, seq_length = micro_batches[0]["tokens"].shape  # whole sequences, also under CP
    micro_batches = split_for_context_parallel(micro_batches, setup, counts, num_tasks)

    def make_loss_func(batch):
        return partial(_loss_func, setup, counts, divisor, num_tasks, batch)

    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, make_loss_func, setup.fused),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def reduce_stats(outputs: list[dict], task_names: tuple[str, ...]) -> StepStats:
    """Sum micro-batch stats, add over DP, and share the last stage's result with all ranks."""
    num_tasks = len(task_names)
    stats = torch.zeros(1 + 2 * num_tasks, dtype=torch.float64)
    for out in outputs:
        stats += out["task_stats"]
    torch.distributed.all_reduce(stats, group=_dp_group())
    torch.distributed.broadcast(
        stats,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    objective, loss_sums, counts = stats[0], stats[1 : 1 + num_tasks], stats[1 + num_tasks :]
    return StepStats(
        loss=float(objective),
        tokens=int(counts.sum()),
        task_loss={n: float(s / c) if c else float("nan") for n, s, c in zip(task_names, loss_sums, counts)},
        task_tokens={n: int(c) for n, c in zip(task_names, counts)},
    )


def train_step(state, micro_batches: list[dict], task_names: tuple[str, ...],
               setup: LossSetup | None = None) -> StepStats:
    """Forward and backward over this rank's micro-batches, then one optimizer step."""
    setup = setup or LossSetup()
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    outputs = _run_schedule(state.chunks, micro_batches, setup, len(task_names), forward_only=False)
    stats = reduce_stats(outputs, task_names)  # the same on every rank, so all skip together
    if not math.isfinite(stats.loss):
        stats.skipped = True
        return stats
    succeeded, grad_norm, _ = state.optimizer.step()
    stats.grad_norm = None if grad_norm is None else float(grad_norm)
    stats.skipped = not succeeded or not math.isfinite(stats.grad_norm or 0.0)
    stats.lr = state.optimizer.param_groups[0]["lr"]
    if setup.task_weights is not None:
        stats.task_weights = {n: float(w) for n, w in zip(task_names, setup.task_weights)}
    if succeeded:
        global_batch = len(micro_batches) * micro_batches[0]["tokens"].shape[0]
        global_batch *= parallel_state.get_data_parallel_world_size()
        state.scheduler.step(increment=global_batch)
    return stats


@torch.no_grad()
def evaluate(state, micro_batches: list[dict], task_names: tuple[str, ...]) -> StepStats:
    """Forward only: the mean token loss of the given micro-batches, overall and per task."""
    for chunk in state.chunks:
        chunk.eval()
    outputs = _run_schedule(state.chunks, micro_batches, LossSetup(mode="token"), len(task_names), True)
    for chunk in state.chunks:
        chunk.train()
    return reduce_stats(outputs, task_names)
