"""The training recipe: build, (resume), train, validate, save."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from megatron.core import parallel_state

from megamft.checkpoint import dist_checkpoint
from megamft.config import MegamftConfig
from megamft.data.batches import GlobalBatchSampler, SampleTable, micro_batches
from megamft.data.dataset import MultitaskData, load_data
from megamft.platform import distributed
from megamft.platform.device import describe_runtime
from megamft.training.setup import TrainingState, build_training_state
from megamft.training.step import StepStats, evaluate, train_step

log = logging.getLogger("megamft")


@dataclass
class RunResult:
    """What a run reports back (identical on every rank)."""

    history: list[StepStats] = field(default_factory=list)
    valid_before: StepStats | None = None
    valid_after: StepStats | None = None
    last_checkpoint: str | None = None


def _dp() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def validation_batches(valid: dict[str, SampleTable], micro_batch_size: int) -> list[dict]:
    """Every task's validation rows, sharded over DP in whole micro-batches."""
    dp_rank, dp_size = _dp()
    batches = []
    for table in valid.values():
        usable = len(table) // (micro_batch_size * dp_size) * micro_batch_size * dp_size
        share = usable // dp_size
        rows = list(range(dp_rank * share, (dp_rank + 1) * share))
        batches += micro_batches(table, rows, micro_batch_size)
    return batches


def _format_tasks(values: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.3f}" for name, value in values.items())


def _log_step(cfg: MegamftConfig, iteration: int, stats: StepStats, seconds: float) -> None:
    """One line per log interval; `seconds` is the mean step time of the interval."""
    if not distributed.is_logging_rank():
        return
    eta = int(seconds * (cfg.train.train_steps - iteration))
    log.info(
        "step %d/%d | loss %.4f | %s | grad-norm %.3f | lr %.2e | %.0f tok/s | eta %d:%02d",
        iteration, cfg.train.train_steps, stats.loss, _format_tasks(stats.task_loss),
        stats.grad_norm or 0.0, stats.lr or 0.0, stats.tokens / max(seconds, 1e-9), eta // 60, eta % 60,
    )


def _resume(state: TrainingState, cfg: MegamftConfig) -> tuple[int, int]:
    """(iteration, consumed samples) to start from."""
    ckpt = cfg.checkpoint
    if not ckpt.load_dir:
        return 0, 0
    progress = dist_checkpoint.load(
        state, ckpt.load_dir, cfg, load_optimizer=ckpt.load_optimizer, iteration=ckpt.load_iteration
    )
    if not ckpt.load_optimizer:
        return 0, 0  # weights only: a fresh fine-tune from these weights
    return progress["iteration"], progress["consumed_samples"]


def _train_loop(cfg, state, data: MultitaskData, result: RunResult, iteration: int, consumed: int):
    sampler = GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, cfg.data.seed)
    dp_rank, dp_size = _dp()
    window_start, window_stats = time.perf_counter(), []
    while iteration < cfg.train.train_steps:
        rows = sampler.rank_indices(consumed, dp_rank, dp_size)
        stats = train_step(state, micro_batches(data.train, rows, cfg.train.micro_batch_size), data.task_names)
        iteration += 1
        consumed += cfg.train.global_batch_size
        result.history.append(stats)
        window_stats.append(stats)
        if iteration % cfg.train.log_interval == 0 or iteration == cfg.train.train_steps:
            elapsed = time.perf_counter() - window_start
            _log_step(cfg, iteration, stats, elapsed / len(window_stats))
            window_start, window_stats = time.perf_counter(), []
        if cfg.train.eval_interval and iteration % cfg.train.eval_interval == 0:
            _log_validation("valid", evaluate(state, validation_batches(data.valid, cfg.train.micro_batch_size), data.task_names))
        ckpt = cfg.checkpoint
        if ckpt.save_dir and ckpt.save_interval and iteration % ckpt.save_interval == 0:
            result.last_checkpoint = str(dist_checkpoint.save(state, ckpt.save_dir, iteration, consumed, cfg))
    return iteration, consumed


def _log_validation(label: str, stats: StepStats) -> None:
    if distributed.is_logging_rank():
        log.info("%s loss %.4f | %s", label, stats.loss, _format_tasks(stats.task_loss))


def run(cfg: MegamftConfig) -> RunResult:
    """Train as configured; the process group is created and destroyed here."""
    runtime = distributed.initialize(cfg)
    try:
        if distributed.is_logging_rank():
            log.info(describe_runtime(runtime))
        data = load_data(cfg.data)
        if cfg.model.vocab_size and cfg.model.vocab_size < data.tokenizer.vocab_size:
            raise ValueError(
                f"the tokenizer has {data.tokenizer.vocab_size} ids but model.vocab_size is "
                f"{cfg.model.vocab_size}; tokenize the data with the model's own tokenizer"
            )
        state = build_training_state(cfg, runtime, data.tokenizer.vocab_size)
        iteration, consumed = _resume(state, cfg)
        result = RunResult()
        valid = validation_batches(data.valid, cfg.train.micro_batch_size)
        result.valid_before = evaluate(state, valid, data.task_names)
        _log_validation("valid (before)", result.valid_before)
        iteration, consumed = _train_loop(cfg, state, data, result, iteration, consumed)
        result.valid_after = evaluate(state, valid, data.task_names)
        _log_validation("valid (after)", result.valid_after)
        ckpt = cfg.checkpoint
        if ckpt.save_dir and (result.last_checkpoint is None or not result.last_checkpoint.endswith(f"{iteration:07d}")):
            result.last_checkpoint = str(dist_checkpoint.save(state, ckpt.save_dir, iteration, consumed, cfg))
        return result
    finally:
        distributed.shutdown()
