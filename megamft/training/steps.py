"""The training steps: each one a short sequence of named phases (train, tidy up, advance, report,
measure, save), until the last step, an early stop or a preemption signal."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

import torch

from megamft.config import MegamftConfig
from megamft.emulation.sync_counter import counting_syncs
from megamft.loss.multitask import effective_task_weights
from megamft.platform import distributed
from megamft.platform.kill_points import kill_point
from megamft.sizing.flops import tflops_per_device
from megamft.training import preference_run
from megamft.training.device_memory import memory_gb
from megamft.training.expert_stats import expert_shares
from megamft.training.measurements import measure, stops_early
from megamft.training.metrics import TaskLossInterval, format_task_losses
from megamft.training.preemption import PreemptionWatch
from megamft.training.run_state import Run, TrainingDiverged
from megamft.training.saving import save_unless_saved
from megamft.training.step import LossSetup, StepStats, train_step
from megamft.training.validation import (
    coba_measurement,
    data_parallel_position,
    pipelined,
    task_loss_tensor,
    validate,
)

log = logging.getLogger("megamft")


@dataclass
class LogWindow:
    """The steps since the last log line: when the window began, how many, and their per-task losses."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    task_losses: TaskLossInterval = field(default_factory=TaskLossInterval)

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.task_losses.add(stats)

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start) / self.steps

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0
        self.task_losses.reset()


def run_steps(run: Run, watch: PreemptionWatch, bar) -> None:
    """Train until train.train_steps, an early stop or a preemption signal, one step at a time."""
    window = LogWindow()
    while run.iteration < run.cfg.train.train_steps:
        stats = train_one_step(run)
        tidy_up(run)
        advance(run, stats, bar)
        report(run, stats, window)
        measure(
            run,
            validate(run, "valid") if _due(run.cfg.train.eval_interval, run) else None,
            save_unless_saved,
        )
        save_if_due(run)
        if stops_early(run) or stopped_for_preemption(run, watch):
            return


def _due(interval: int, run: Run) -> bool:
    return bool(interval) and run.iteration % interval == 0


def train_one_step(run: Run) -> StepStats:
    """Forward, backward and optimizer step over this rank's share of the next global batch."""
    if run.preference is not None:
        return preference_run.train_one_step(run, _loss_setup(run))
    train = run.cfg.train
    dp_rank, dp_size = data_parallel_position()
    rows = run.data.train_rows(run.consumed, train.global_batch_size, dp_rank, dp_size)
    batches = run.data.batches(rows, train.micro_batch_size, same_length=pipelined())
    if run.balancer is not None:
        run.balancer.before_step(run.iteration)
    before_forward = run.expert_stats.route_tasks if run.expert_stats is not None else None
    with counting_syncs() as syncs:  # each one stalls the host until the GPU's queue drains
        stats = train_step(
            run.state, batches, run.data.task_names, _loss_setup(run), before_forward
        )
    stats.device_syncs = syncs.value
    if syncs.value is not None:
        log.debug("step %d: %d device-to-host synchronizations", run.iteration + 1, syncs.value)
    return stats


def tidy_up(run: Run) -> None:
    """Between steps: publish finished asynchronous saves; collect garbage every train.gc_interval steps."""
    if run.async_saves is not None:
        run.async_saves.poll()
    interval = run.cfg.train.gc_interval
    if interval and (run.iteration + 1) % interval == 0:
        gc.collect()


def advance(run: Run, stats: StepStats, bar) -> None:
    """Count the step done: samples per task, iteration and consumed samples, skips, the balancer's update."""
    if run.preference is not None:
        preference_run.count_pairs(run)
    else:
        _count_task_samples(run)
    run.iteration += 1
    run.consumed += run.cfg.train.global_batch_size
    kill_point("step.done", run.iteration)
    run.result.history.append(stats)
    bar.update()
    _check_skipped(run, stats)
    _after_step(run, stats)


def report(run: Run, stats: StepStats, window: LogWindow) -> None:
    """Metrics of every step to the sinks; a log line (and expert statistics) every train.log_interval."""
    window.add(stats)
    seconds = window.seconds_per_step()
    measured = _throughput(run, stats, seconds)
    if distributed.is_logging_rank():
        tokens_per_second = measured.pop("tokens_per_second")
        run.metrics.train(run.iteration, stats, tokens_per_second, measured)
        measured["tokens_per_second"] = tokens_per_second
    if _due(run.cfg.train.log_interval, run) or run.iteration == run.cfg.train.train_steps:
        log_step(run.cfg, run.iteration, stats, seconds, measured, window.task_losses.means())
        _log_experts(run)
        window.reset()


def save_if_due(run: Run) -> None:
    """A checkpoint every checkpoint.save_interval steps (unless this step is saved already)."""
    if _due(run.cfg.checkpoint.save_interval, run):
        save_unless_saved(run)


def stopped_for_preemption(run: Run, watch: PreemptionWatch) -> bool:
    """After a preemption signal: save this step (unless saved) and stop."""
    if not watch.requested():
        return False
    run.result.preempted = True
    save_unless_saved(run)
    if distributed.is_logging_rank():
        log.warning(
            "preemption signal: stopped after step %d, checkpoint %s",
            run.iteration,
            run.result.last_checkpoint,
        )
    return True


def _throughput(run: Run, stats: StepStats, seconds: float) -> dict:
    """tokens/s, TFLOP/s per device, MFU (when a peak is configured) and memory."""
    tokens_per_second = stats.tokens / max(seconds, 1e-9)
    # Model FLOPs count every token position computed, learned or not.
    rows_per_second = run.cfg.train.global_batch_size / max(seconds, 1e-9)
    tflops = tflops_per_device(
        run.cfg, run.state.vocab_size, rows_per_second, torch.distributed.get_world_size()
    )
    values = {
        "tokens_per_second": tokens_per_second,
        "tflops_per_device": tflops,
        "memory_gb": memory_gb(),
    }
    if run.cfg.train.peak_tflops_per_device:
        values["mfu"] = tflops / run.cfg.train.peak_tflops_per_device
    if stats.loss_scale is not None:
        values["loss_scale"] = stats.loss_scale
    return values


def log_step(
    cfg: MegamftConfig,
    iteration: int,
    stats: StepStats,
    seconds: float,
    measured: dict,
    task_losses: dict[str, float | None],
) -> None:
    """One line per log interval: the step's loss, each task's mean loss over the interval (`task_losses`),
    and `seconds`, the mean step time of the interval."""
    if not distributed.is_logging_rank():
        return
    eta = int(seconds * (cfg.train.train_steps - iteration))
    mfu = f" | MFU {measured['mfu']:.1%}" if "mfu" in measured else ""
    if (
        stats.device_syncs is not None
    ):  # counted under the CPU emulation, or on CUDA with MEGAMFT_COUNT_SYNCS=1
        mfu += f" | syncs {stats.device_syncs}"
    mfu += "".join(f" | {name} {value:.4g}" for name, value in stats.router_losses.items())
    grad = "skipped" if stats.skipped else f"{stats.grad_norm or 0.0:.3f}"
    # Preference objectives: the step's per-task preference accuracy and reward margin instead of token losses.
    tasks = (
        preference_run.format_metrics(stats.preference)
        if stats.preference
        else format_task_losses(task_losses)
    )
    log.info(
        "step %d/%d | loss %.4f | %s | grad-norm %s | lr %.2e | %.0f tok/s | %.2f TFLOP/s/dev%s | "
        "mem %.3g GB | eta %d:%02d",
        iteration,
        cfg.train.train_steps,
        stats.loss,
        tasks,
        grad,
        stats.lr or 0.0,
        measured["tokens_per_second"],
        measured["tflops_per_device"],
        mfu,
        measured["memory_gb"],
        eta // 60,
        eta % 60,
    )


def _loss_setup(run: Run) -> LossSetup:
    loss = run.cfg.loss
    weights = effective_task_weights(
        loss.mode, len(run.data.task_names), run.static_weights, run.balancer
    )
    m = run.cfg.model
    router = (m.moe_aux_loss_coeff, m.moe_z_loss_coeff) if m.num_experts else None
    return LossSetup(
        loss.mode, loss.normalization, weights, loss.focal_gamma, loss.fused_cross_entropy, router
    )


def _after_step(run: Run, stats: StepStats) -> None:
    if run.balancer is None:
        return
    run.balancer.after_train_step(run.iteration, task_loss_tensor(stats))
    step = run.iteration - 1  # the 0-based index of the step just done
    if run.cfg.loss.mode == "coba" and run.balancer.wants_validation(step):
        run.balancer.observe_validation(step, coba_measurement(run, step))


def _check_skipped(run: Run, stats: StepStats) -> None:
    """Count skipped steps and say why; stop after too many non-finite ones in a row.

    An fp16 overflow while the dynamic loss scale is above its floor is the scaler
    calibrating (it halves the scale and the step is skipped, as in Megatron-LM):
    counted apart and not held against the run. Anything else non-finite counts
    towards train.max_skipped_steps.
    """
    if not stats.skipped:
        run.skipped_in_a_row = 0
        _check_gradient_moved(run, stats)
        return
    floor = float(run.cfg.optimizer.get("min_loss_scale", 1.0))
    if stats.overflow and stats.loss_scale is not None and stats.loss_scale > floor:
        run.result.loss_scale_skips += 1
        if distributed.is_logging_rank():
            log.info(
                "step %d skipped by the fp16 loss scaler: gradients overflowed, loss scale now %g "
                "(expected while the scale calibrates; %d such steps so far)",
                run.iteration,
                stats.loss_scale,
                run.result.loss_scale_skips,
            )
        return
    run.skipped_in_a_row += 1
    run.result.skipped_steps += 1
    if distributed.is_logging_rank():
        log.warning(
            "step %d skipped: non-finite loss or gradient (%d in a row)",
            run.iteration,
            run.skipped_in_a_row,
        )
    if run.skipped_in_a_row > run.cfg.train.max_skipped_steps:
        raise TrainingDiverged(
            f"{run.skipped_in_a_row} steps in a row had a non-finite loss or gradient (limit "
            f"train.max_skipped_steps={run.cfg.train.max_skipped_steps}); lower optimizer.lr or check the data "
            "around this step, then resume from the last checkpoint"
        )


def _check_gradient_moved(run: Run, stats: StepStats) -> None:
    """A trainable model whose whole gradient is exactly zero learned nothing this step: say so."""
    if stats.grad_norm != 0.0 or not distributed.is_logging_rank():
        return
    if stats.tokens == 0:
        log.warning(
            "step %d: the global batch holds no learned token (every loss mask is 0); nothing was learned",
            run.iteration,
        )
        return
    log.warning(
        "step %d: the gradient norm is exactly 0 over %d learned tokens: the weights did not change. "
        "Check that the parameters are trainable and, with train.precision=fp16, the loss scale "
        "(optimizer.initial_loss_scale, optimizer.min_loss_scale)",
        run.iteration,
        stats.tokens,
    )


def _log_experts(run: Run) -> None:
    """Per-task expert statistics of the log interval (the one read of their device counts)."""
    if run.expert_stats is None:
        return
    counts = run.expert_stats.read()
    if not distributed.is_logging_rank():
        return
    shares = expert_shares(counts, run.data.task_names)
    run.metrics.experts(run.iteration, counts, shares, run.data.task_names)
    top = " | ".join(
        f"{task} " + ",".join(str(int(e)) for e in share.argsort(descending=True)[:3])
        for task, share in shares.items()
    )
    log.info("step %d experts (top 3 per task, all layers): %s", run.iteration, top)


def _count_task_samples(run: Run) -> None:
    """Add the samples of the global batch about to be consumed, per task (same on every rank)."""
    counts = run.result.task_samples
    for tasks, _ in run.data.train_rows(run.consumed, run.cfg.train.global_batch_size, 0, 1):
        for task in tasks.tolist():
            name = run.data.task_names[task]
            counts[name] = counts.get(name, 0) + 1
