"""Validation: every task's held-out sequences sharded over DP, their losses logged; CoBa's
measurements of them."""

from __future__ import annotations

import logging

import numpy as np
import torch
from megatron.core import parallel_state

from megamft.config import ConfigError
from megamft.data.dataset import MultitaskData
from megamft.platform import distributed
from megamft.training import preference_run
from megamft.training.metrics import format_task_losses, present_task_losses
from megamft.training.run_state import Run
from megamft.training.step import StepStats, evaluate, evaluate_task_loss

log = logging.getLogger("megamft")


def data_parallel_position() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def pipelined() -> bool:
    """Pipeline schedules need one sequence length for all micro-batches of a step."""
    return parallel_state.get_pipeline_model_parallel_world_size() > 1


def validation_batches(data: MultitaskData, micro_batch_size: int) -> list[dict]:
    """Every task's validation sequences, sharded over DP in whole micro-batches.

    Each task's rows are topped up with empty (all-padding, unlearned) rows to a
    multiple of micro-batch x DP, so every layout measures the same tokens.
    Empty rows are masked out entirely, so they change no loss.
    """
    dp_rank, dp_size = data_parallel_position()
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    rows = []
    for task_rows in data.valid.values():
        padded = -(-len(task_rows) // (micro_batch_size * dp_size)) * micro_batch_size * dp_size
        share = padded // dp_size
        rows += [
            task_rows.row(r) if r < len(task_rows) else empty
            for r in range(dp_rank * share, (dp_rank + 1) * share)
        ]
    # The interleaved schedule wants a multiple of PP micro-batches.
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rows += [empty] * ((-(len(rows) // micro_batch_size) % pp) * micro_batch_size)
    return data.batches(rows, micro_batch_size, same_length=pipelined())


def mixed_validation_batches(data: MultitaskData, micro_batch_size: int) -> list[dict]:
    """All tasks' validation sequences in one seeded, task-mixed order, sharded over DP in whole
    micro-batches (every rank gets as many; the last ones topped up with empty rows): the stream
    CoBa samples from, like MFTCoder's shuffled validation loader."""
    dp_rank, dp_size = data_parallel_position()
    rows = [task_rows.row(r) for task_rows in data.valid.values() for r in range(len(task_rows))]
    order = np.random.default_rng(data.cfg.seed).permutation(len(rows))
    per_rank = -(-len(rows) // (micro_batch_size * dp_size)) * micro_batch_size
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    mine = [
        rows[order[i]] if i < len(rows) else empty
        for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    ]
    return data.batches(mine, micro_batch_size, same_length=pipelined())


def validate(run: Run, label: str) -> StepStats | None:
    if run.preference is not None:
        return preference_run.validate(run, label)
    batches = validation_batches(run.data, run.cfg.train.micro_batch_size)
    if not batches:
        return None  # data.valid_samples_per_task=0: no validation set
    stats = evaluate(run.state, batches, run.data.task_names)
    if distributed.is_logging_rank():
        log.info(
            "%s loss %.4f | %s", label, stats.loss, format_task_losses(present_task_losses(stats))
        )
        run.metrics.valid(run.iteration, stats)
    return stats


def task_loss_tensor(stats: StepStats) -> torch.Tensor:
    return torch.tensor(list(stats.task_loss.values()), dtype=torch.float64)


def coba_measurement(run: Run, step: int) -> torch.Tensor:
    """CoBa's per-task validation loss after `step`.

    sampled_batch: a few micro-batches, forward only; the result stays on the
    device (CoBa reads it at its next update: one device-to-host read per update,
    none during warm-up). full: the whole validation set, read at once.
    """
    loss = run.cfg.loss
    if loss.coba_validation == "full":
        return task_loss_tensor(validate(run, "coba valid"))
    if run.coba_stream is None:
        run.coba_stream = mixed_validation_batches(run.data, run.cfg.train.micro_batch_size)
    count, stream = loss.coba_valid_micro_batches, run.coba_stream
    # MFTCoder's cursor: sample i of the measurement after step s reads batch (count * s // interval + i).
    first = count * step // loss.coba_update_interval
    batches = [stream[(first + i) % len(stream)] for i in range(count)]
    return evaluate_task_loss(
        run.state, batches, len(run.data.task_names), loss.coba_valid_reduction
    )


def start_coba(run: Run, valid_before: StepStats | None) -> None:
    """CoBa's normalizer: the per-task loss of the evaluation before step 0 (kept on resume)."""
    if run.cfg.loss.mode != "coba":
        return
    if valid_before is None:
        raise ConfigError(
            "loss.mode=coba needs validation data: set data.valid_samples_per_task > 0"
        )
    run.balancer.set_normalizer(task_loss_tensor(valid_before))
