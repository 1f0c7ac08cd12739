"""One optimizer step and one evaluation pass through megatron's schedules."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from megamft.loss.fused_ce import fused_multitask_cross_entropy
from megamft.loss.multitask import (
    BatchCounts,
    count,
    focal_sample_factor,
    sample_index,
    structural_mode,
    task_sums,
    token_weights,
)
from megamft.loss.preference import PreferenceSetup
from megamft.training import preference_step, router_losses

BeforeForward = Callable[[dict], None]
"""Called with each micro-batch (on the device) just before the model runs it."""


@dataclass
class LossSetup:
    """What every micro-batch of one step needs to weigh its tokens."""

    mode: str = "token"
    normalization: str = "global_batch"
    task_weights: torch.Tensor | None = None  # effective weights for this step (static x dynamic)
    focal_gamma: float = 2.0
    fused: bool = False  # megamft's fused cross entropy on the model's vocab-parallel logits
    router_loss_coeffs: tuple[float, float] | None = (
        None  # MoE: (load balancing, z); see router_losses
    )
    preference: PreferenceSetup | None = (
        None  # a preference objective on pair micro-batches (preference_step)
    )


@dataclass
class StepStats:
    """Global-batch metrics, identical on every rank after `reduce_stats`."""

    loss: float  # the objective: sum over the global batch of w_i * l_i
    tokens: int
    task_loss: dict[str, float]  # mean token loss per task
    task_tokens: dict[str, int]
    task_weights: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    lr: float | None = None
    skipped: bool = False
    overflow: bool = (
        False  # the optimizer found inf/NaN gradients (fp16: the loss scale overflowed)
    )
    loss_scale: float | None = None  # fp16's dynamic loss scale after the step
    device_syncs: int | None = (
        None  # device-to-host synchronizations in the step (emulation.sync_counter)
    )
    router_losses: dict[str, float] = field(default_factory=dict)  # MoE auxiliary losses, unscaled
    preference: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # reward metrics per task (preference)


def _dp_group():
    """Ranks whose token sums add up to the global batch's: DP x CP (CP ranks hold sequence parts)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def global_counts(
    micro_batches: list[dict], num_tasks: int, indices: list | None = None
) -> tuple[BatchCounts, int]:
    """Token and sample counts of the whole global batch (all micro-batches, all DP ranks), and its
    token positions (padding included; micro-batches differ in length with data.mode=dynamic).

    Counted on the host, from the data loader's tensors, before anything reaches
    the device, and summed over megatron's gloo DP group in one all-reduce: no
    device work and no GPU stall. Counted on whole sequences, before any
    context-parallel split, so over DP ranks only. `indices`: each micro-batch's
    `sample_index`, if computed.
    """
    local = BatchCounts.zeros(num_tasks)
    for batch, samples in zip(micro_batches, indices or [None] * len(micro_batches)):
        local = local + count(
            batch["loss_mask"], batch["task_ids"], batch.get("sample_ids"), num_tasks, samples
        )
    positions = torch.tensor([sum(b["tokens"].numel() for b in micro_batches)], dtype=torch.float64)
    flat = torch.cat([local.as_tensor(), positions])
    torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group_gloo())
    return BatchCounts.from_tensor(flat[:-1]), int(flat[-1])


# Used on the host only: packed_seq_params carries the boundaries to the device.
_HOST_ONLY_KEYS = ("sample_ids", "cu_seqlens", "padding")


def prepare(
    micro_batches: list[dict], setup: LossSetup, num_tasks: int
) -> tuple[list[dict], BatchCounts, int]:
    """Host-side loss bookkeeping of one step: every token's weight and sample index.

    Everything here depends only on masks, task ids and sample ids, which the
    host has before the forward pass; doing it here keeps it off the GPU's
    critical path and free of device-to-host synchronizations. Under context
    parallelism the weights are computed on whole sequences, then megatron's
    load-balanced split (chunks r and 2CP-1-r) keeps this rank's share. On a GPU
    machine the tensors are pinned, so that their copies overlap with compute.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    indices = [sample_index(b.get("sample_ids"), b["loss_mask"].shape) for b in micro_batches]
    counts, positions = global_counts(micro_batches, num_tasks, indices)
    weights = setup.task_weights if setup.task_weights is not None else torch.ones(num_tasks)
    prepared = []
    for batch, samples in zip(micro_batches, indices):
        mask, tasks, sample_ids = batch["loss_mask"], batch["task_ids"], batch.get("sample_ids")
        batch_counts = counts
        if setup.normalization == "per_microbatch":
            batch_counts = count(mask, tasks, sample_ids, num_tasks, samples)
        w = token_weights(
            structural_mode(setup.mode),
            mask,
            tasks,
            sample_ids,
            batch_counts,
            weights,
            samples=samples,
        )
        ready = {k: v for k, v in batch.items() if k not in _HOST_ONLY_KEYS}
        if "packed_seq_params" in ready:
            ready.pop(
                "attention_mask", None
            )  # the TE and torch backends read the boundaries instead
        ready.update(token_weights=w.float(), sample_index=samples[0].view(mask.shape))
        split_keys = _CP_SPLIT_KEYS
        if setup.router_loss_coeffs is not None:  # MoE: each token's task for the expert statistics
            ready["routed_task_ids"] = _routed_task_ids(tasks, batch.get("padding"), num_tasks)
            split_keys += ("routed_task_ids",)
        if parallel_state.get_context_parallel_world_size() > 1:
            ready = get_batch_on_this_cp_rank({k: ready[k] for k in split_keys})
        if torch.cuda.is_available():
            ready = {
                k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in ready.items()
            }
            if "packed_seq_params" in ready:
                ready["packed_seq_params"] = _map_boundaries(
                    ready["packed_seq_params"], torch.Tensor.pin_memory
                )
        ready["num_samples"] = samples[1]
        prepared.append(ready)
    return prepared, counts, positions


def _routed_task_ids(
    tasks: torch.Tensor, padding: torch.Tensor | None, num_tasks: int
) -> torch.Tensor:
    """Task id per token, num_tasks for padding (it is routed too, but belongs to no task)."""
    return tasks if padding is None else tasks.masked_fill(padding, num_tasks)


_CP_SPLIT_KEYS = (
    "tokens",
    "labels",
    "loss_mask",
    "task_ids",
    "sample_index",
    "position_ids",
    "token_weights",
)


def _fused_objective(logits: torch.Tensor, batch: dict, w: torch.Tensor, num_tasks: int):
    """(sum of w x loss, per-token loss) from this TP rank's vocab shard of the logits."""
    mask = batch["loss_mask"]
    vocab_local = logits.shape[-1]
    out = fused_multitask_cross_entropy(
        logits.reshape(-1, vocab_local),
        batch["labels"].reshape(-1),
        w.reshape(-1),
        mask.reshape(-1),
        batch["task_ids"].reshape(-1),
        batch["sample_index"].reshape(-1),
        num_tasks,
        batch["num_samples"],
        vocab_start=parallel_state.get_tensor_model_parallel_rank() * vocab_local,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        check_ids=False,  # ids were checked on the host; a device check would stall every micro-batch
    )
    return out.total, out.per_token_loss.view_as(mask)


def _loss_func(
    setup: LossSetup,
    divisor: float,
    total_tokens: float,
    num_tasks: int,
    batch: dict,
    output: torch.Tensor,
):
    """megatron's loss_func: (K x this micro-batch's share of the objective, learned tokens, stats).

    megatron divides the gradients by the sum of the returned token counts, K,
    over all micro-batches and DP ranks, so multiplying by K leaves exactly the
    objective's gradient. Everything here stays on the device.
    """
    mask, tasks, w = batch["loss_mask"], batch["task_ids"], batch["token_weights"]
    if setup.fused:  # output: vocab-parallel logits
        objective, per_token_loss = _fused_objective(output, batch, w, num_tasks)
    else:  # output: megatron's per-token cross entropy
        per_token_loss = output
        if setup.mode == "focal":
            w = (
                w
                * focal_sample_factor(
                    per_token_loss,
                    mask,
                    batch["sample_index"],
                    batch["num_samples"],
                    setup.focal_gamma,
                ).float()
            )
        objective = (per_token_loss.float() * w).sum()
    objective = objective / divisor
    masked = per_token_loss.detach().float() * mask
    stats = torch.cat(
        [
            objective.detach().double().reshape(1),
            task_sums(masked, tasks, num_tasks),
            task_sums(mask, tasks, num_tasks),
        ]
    )
    return objective * total_tokens, mask.sum().to(torch.int), {"task_stats": stats}


def to_device(batch: dict) -> dict:
    """The micro-batch on the model's device (asynchronous copies from pinned memory, see `prepare`)."""
    device = torch.cuda.current_device()
    moved = {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    packed = batch.get("packed_seq_params")
    if packed is not None:
        moved["packed_seq_params"] = _map_boundaries(
            packed, lambda t: t.to(device, non_blocking=True)
        )
    return moved


def _map_boundaries(packed, fn):
    """The PackedSeqParams (or RowDocuments) with fn applied to cu_seqlens (once when q and kv share them)."""
    q = fn(packed.cu_seqlens_q)
    kv = q if packed.cu_seqlens_kv is packed.cu_seqlens_q else fn(packed.cu_seqlens_kv)
    return dataclasses.replace(packed, cu_seqlens_q=q, cu_seqlens_kv=kv)


def _forward_step(
    make_loss_func, fused: bool, before_forward: BeforeForward | None, data_iterator, model
):
    """megatron's forward_step_func: run one micro-batch, return output and loss_func."""
    batch = to_device(next(data_iterator))
    if before_forward is not None:
        before_forward(batch)
    labels = None if fused else batch["labels"]  # without labels the last stage returns logits
    # The fused loss reads bf16/fp16 logits as they are: Float16Module's default
    # upcast would make an fp32 copy of [tokens, vocab] first.
    half = {"fp32_output": False} if fused and isinstance(model.module, Float16Module) else {}
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=labels,
        packed_seq_params=batch.get("packed_seq_params"),
        **half,
    )
    return output, make_loss_func(batch)


def _run_schedule(
    chunks,
    micro_batches: list[dict],
    setup: LossSetup,
    num_tasks: int,
    forward_only: bool,
    before_forward: BeforeForward | None = None,
    reference: bool = False,
):
    divisor = 1.0
    if setup.normalization == "per_microbatch":  # MFTCoder: mean over micro-batches and DP ranks
        divisor = float(len(micro_batches) * parallel_state.get_data_parallel_world_size())
    micro_batch_size, seq_length = micro_batches[0][
        "tokens"
    ].shape  # whole sequences, also under CP
    micro_batches, counts, positions = prepare(micro_batches, setup, num_tasks)
    total_tokens = float(counts.task_tokens.sum())
    if setup.router_loss_coeffs is not None and not forward_only:
        router_losses.scale_to_global_batch(
            get_model_config(chunks[0]), setup.router_loss_coeffs, total_tokens, positions
        )

    def make_loss_func(batch):
        if reference:
            return partial(preference_step.reference_loss_func, num_tasks, setup.fused, batch)
        if setup.preference is not None:
            return partial(
                preference_step.preference_loss_func,
                setup.preference,
                total_tokens,
                num_tasks,
                setup.fused,
                batch,
            )
        return partial(_loss_func, setup, divisor, total_tokens, num_tasks, batch)

    if setup.preference is not None or reference:
        indices = [(b["sample_index"], b["num_samples"]) for b in micro_batches]
        micro_batches = preference_step.prepare_pairs(
            micro_batches, indices, num_tasks, setup.task_weights
        )

    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, make_loss_func, setup.fused, before_forward),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def reduce_stats(
    outputs: list[dict], task_names: tuple[str, ...], router: torch.Tensor | None = None
) -> StepStats:
    """Sum micro-batch stats, add over DP, and share the last stage's result with all ranks.

    `router`: MoE auxiliary losses, already reduced (router_losses.reduced), read in the same read.
    """
    num_tasks = len(task_names)
    stats = torch.zeros(1 + 2 * num_tasks, dtype=torch.float64, device=torch.cuda.current_device())
    for out in outputs:
        stats += out["task_stats"]
    torch.distributed.all_reduce(stats, group=_dp_group())
    torch.distributed.broadcast(
        stats,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    # The step's one read of device results: every rank needs them to decide on skipping.
    values = (
        torch.cat([stats, router.to(stats.dtype)]).tolist()
        if router is not None
        else stats.tolist()
    )
    router_values = values[1 + 2 * num_tasks :]
    objective, loss_sums, counts = (
        values[0],
        values[1 : 1 + num_tasks],
        values[1 + num_tasks : 1 + 2 * num_tasks],
    )
    return StepStats(
        loss=float(objective),
        tokens=int(sum(counts)),
        task_loss={
            n: float(s / c) if c else float("nan") for n, s, c in zip(task_names, loss_sums, counts)
        },
        task_tokens={n: int(c) for n, c in zip(task_names, counts)},
        router_losses=_named_router_losses(router_values),
    )


def _named_router_losses(values: list[float]) -> dict[str, float]:
    """{logged name: value} of router_losses.reduced's values, those the model has (finite)."""
    return {name: v for name, v in zip(router_losses.TRACKED.values(), values) if math.isfinite(v)}


def train_step(
    state,
    micro_batches: list[dict],
    task_names: tuple[str, ...],
    setup: LossSetup | None = None,
    before_forward: BeforeForward | None = None,
) -> StepStats:
    """Forward and backward over this rank's micro-batches, then one optimizer step.

    `before_forward(batch)` sees each micro-batch, on the device, just before the model runs it
    (ExpertStats.route_tasks: the task of each token, for the routers' hooks).
    """
    setup = setup or LossSetup()
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    outputs = _run_schedule(
        state.chunks,
        micro_batches,
        setup,
        len(task_names),
        forward_only=False,
        before_forward=before_forward,
    )
    router = None
    if setup.router_loss_coeffs is not None:
        router = router_losses.reduced(get_model_config(state.chunks[0]), len(micro_batches))
    if setup.preference is not None:
        stats = _preference_stats(outputs, micro_batches, task_names, router)
    else:
        stats = reduce_stats(
            outputs, task_names, router
        )  # the same on every rank, so all skip together
    if not math.isfinite(stats.loss):
        stats.skipped = True
        return stats
    succeeded, grad_norm, _ = state.optimizer.step()
    stats.grad_norm = None if grad_norm is None else float(grad_norm)
    stats.overflow = not succeeded
    stats.skipped = not succeeded or not math.isfinite(stats.grad_norm or 0.0)
    if state.optimizer.config.fp16:  # the scaler has already reacted to this step's gradients
        stats.loss_scale = float(state.optimizer.get_loss_scale())
    stats.lr = state.optimizer.param_groups[0]["lr"]
    if setup.task_weights is not None:
        stats.task_weights = {n: float(w) for n, w in zip(task_names, setup.task_weights)}
    if succeeded:
        global_batch = _sequences(micro_batches, setup.preference is not None)
        global_batch *= parallel_state.get_data_parallel_world_size()
        state.scheduler.step(increment=global_batch)
    return stats


def _sequences(micro_batches: list[dict], preference: bool) -> int:
    """This rank's sequences of the step: rows, or two per pair (packed pairs share rows)."""
    if preference:
        return sum(2 * b["ref_logps"].shape[0] for b in micro_batches)
    return len(micro_batches) * micro_batches[0]["tokens"].shape[0]


def _preference_stats(
    outputs: list[dict],
    micro_batches: list[dict],
    task_names: tuple[str, ...],
    router: torch.Tensor | None = None,
) -> StepStats:
    """The objective and reward metrics; `router`: MoE auxiliary losses (router_losses.reduced)."""
    loss, metrics = preference_step.reduce_preference_stats(outputs, task_names)
    tokens = sum(float(b["loss_mask"].sum()) for b in micro_batches)  # this rank's; metrics only
    router_values = [] if router is None else router.double().tolist()
    return StepStats(
        loss=loss,
        tokens=int(tokens),
        task_loss={},
        task_tokens={},
        preference=metrics,
        router_losses=_named_router_losses(router_values),
    )


@torch.no_grad()
def reference_logps(
    state, micro_batches: list[dict], num_tasks: int, fused: bool = False
) -> list[torch.Tensor]:
    """Forward only: each micro-batch's pairs' log-probabilities, [pairs, 2] float64 on the host.

    `fused`: from the fused cross entropy's per-sample sums, as training computes them with
    loss.fused_cross_entropy (so that at the first step policy and reference agree bitwise).

    Read on the last pipeline stage (the others get empty lists: they never compute a pair's loss).
    """
    for chunk in state.chunks:
        chunk.eval()
    setup = LossSetup(mode="token", fused=fused, preference=PreferenceSetup("simpo"))
    outputs = _run_schedule(state.chunks, micro_batches, setup, num_tasks, True, reference=True)
    for chunk in state.chunks:
        chunk.train()
    return [out["pair_logps"].cpu() for out in outputs]


@torch.no_grad()
def evaluate(state, micro_batches: list[dict], task_names: tuple[str, ...]) -> StepStats:
    """Forward only: the mean token loss of the given micro-batches, overall and per task."""
    for chunk in state.chunks:
        chunk.eval()
    outputs = _run_schedule(
        state.chunks, micro_batches, LossSetup(mode="token"), len(task_names), True
    )
    for chunk in state.chunks:
        chunk.train()
    return reduce_stats(outputs, task_names)


@torch.no_grad()
def evaluate_task_loss(
    state, micro_batches: list[dict], num_tasks: int, reduction: str
) -> torch.Tensor:
    """Forward only: per-task mean token loss of these micro-batches, as a device tensor (no host read).

    Each DP rank brings its own micro-batches. reduction 'rank_mean': each rank's
    task mean, averaged over the ranks holding the task (MFTCoder's CoBa);
    'token_mean': the token mean of all ranks' tokens. A task absent everywhere
    reads 0. The result is on every rank; reading it is left to the caller.
    """
    for chunk in state.chunks:
        chunk.eval()
    outputs = _run_schedule(state.chunks, micro_batches, LossSetup(mode="token"), num_tasks, True)
    for chunk in state.chunks:
        chunk.train()
    stats = torch.zeros(1 + 2 * num_tasks, dtype=torch.float64, device=torch.cuda.current_device())
    for out in outputs:
        stats += out["task_stats"]
    sums_counts = stats[1:]
    if (
        parallel_state.get_context_parallel_world_size() > 1
    ):  # CP ranks hold parts of the same sequences
        torch.distributed.all_reduce(sums_counts, group=parallel_state.get_context_parallel_group())
    sums, counts = sums_counts[:num_tasks], sums_counts[num_tasks:]
    if reduction == "rank_mean":
        pair = torch.cat([sums / counts.clamp(min=1), (counts > 0).double()])
    else:
        pair = torch.cat([sums, counts])
    torch.distributed.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    loss = pair[:num_tasks] / pair[num_tasks:].clamp(min=1)
    torch.distributed.broadcast(
        loss,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return loss
