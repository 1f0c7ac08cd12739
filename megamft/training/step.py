"""One optimizer step and one evaluation pass through megatron's schedules."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megamft.loss.token_loss import masked_token_loss


@dataclass
class StepStats:
    """Global-batch metrics, identical on every rank after `reduce_stats`."""

    loss: float
    tokens: int
    task_loss: dict[str, float]
    task_tokens: dict[str, int]
    grad_norm: float | None = None
    lr: float | None = None
    skipped: bool = False
    extra: dict = field(default_factory=dict)


def _forward_step(num_tasks: int, data_iterator, model):
    """megatron's forward_step_func: run one micro-batch, return output and loss_func."""
    batch = next(data_iterator)
    per_token_loss = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"]
    )
    return per_token_loss, partial(
        masked_token_loss,
        loss_mask=batch["loss_mask"],
        task_ids=batch["task_ids"],
        num_tasks=num_tasks,
    )


def _run_schedule(chunks, micro_batches: list[dict], num_tasks: int, forward_only: bool):
    micro_batch_size, seq_length = micro_batches[0]["tokens"].shape
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, num_tasks),
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
    stats = torch.zeros(2 * num_tasks, dtype=torch.float64)
    for out in outputs:
        stats += out["task_stats"]
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(stats, group=group)
    torch.distributed.broadcast(
        stats,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    loss_sums, counts = stats[:num_tasks], stats[num_tasks:]
    total = float(counts.sum())
    return StepStats(
        loss=float(loss_sums.sum()) / max(total, 1.0),
        tokens=int(total),
        task_loss={n: float(s / c) if c else float("nan") for n, s, c in zip(task_names, loss_sums, counts)},
        task_tokens={n: int(c) for n, c in zip(task_names, counts)},
    )


def train_step(state, micro_batches: list[dict], task_names: tuple[str, ...]) -> StepStats:
    """Forward and backward over this rank's micro-batches, then one optimizer step."""
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    outputs = _run_schedule(state.chunks, micro_batches, len(task_names), forward_only=False)
    succeeded, grad_norm, _ = state.optimizer.step()
    stats = reduce_stats(outputs, task_names)
    stats.grad_norm = None if grad_norm is None else float(grad_norm)
    stats.skipped = not succeeded
    stats.lr = state.optimizer.param_groups[0]["lr"]
    if succeeded:
        global_batch = len(micro_batches) * micro_batches[0]["tokens"].shape[0]
        global_batch *= parallel_state.get_data_parallel_world_size()
        state.scheduler.step(increment=global_batch)
    return stats


@torch.no_grad()
def evaluate(state, micro_batches: list[dict], task_names: tuple[str, ...]) -> StepStats:
    """Forward only: the loss of the given micro-batches, per task."""
    for chunk in state.chunks:
        chunk.eval()
    outputs = _run_schedule(state.chunks, micro_batches, len(task_names), forward_only=True)
    for chunk in state.chunks:
        chunk.train()
    return reduce_stats(outputs, task_names)
