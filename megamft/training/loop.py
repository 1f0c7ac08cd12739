"""The training recipe: build, (resume), train, validate, save."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megamft.checkpoint import dist_checkpoint, run_folder
from megamft.config import ConfigError, MegamftConfig
from megamft.config.task_weights import loss_weight_problems
from megamft.data.dataset import MultitaskData, load_data
from megamft.data.sequences import PACKED_ATTENTION
from megamft.errors import UserError
from megamft.loss.balancers import make_balancer
from megamft.loss.multitask import effective_task_weights
from megamft.platform import distributed
from megamft.platform.kill_points import kill_point
from megamft.platform.folder_lock import FolderLock
from megamft.platform.sync_counter import counting_syncs
from megamft.platform.output_folder import DestinationError
from megamft.platform.shared_folder import NotSharedError, confirm_shared
from megamft.model.attention_window import check_backend_honours_window
from megamft.model.attention import activate_flash_attention
from megamft.model.spec import attention_backend_for
from megamft.platform.device import describe_runtime
from megamft.training import data_checks
from megamft.training.data_report import report_data
from megamft.training.expert_stats import ExpertStats, expert_shares
from megamft.training.index_sharing import index_sharing
from megamft.training.kernel_startup import prepare_fused_kernels
from megamft.training.metrics import MetricsWriter, TaskLossInterval, format_task_losses, present_task_losses
from megamft.training.preemption import PreemptionWatch
from megamft.training.code_eval import CodeEvaluator
from megamft.training.measurements import evaluate_code, measure, stops_early
from megamft.training.selection import Selection, best_summary
from megamft.training.throughput import memory_gb, tflops_per_device
from megamft.training.setup import TrainingState, build_training_state
from megamft.training.step import LossSetup, StepStats, evaluate, evaluate_task_loss, train_step

log = logging.getLogger("megamft")


class TrainingDiverged(UserError, RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient (the learning rate or the data)."""


@dataclass
class RunResult:
    """What a run reports back (identical on every rank)."""

    history: list[StepStats] = field(default_factory=list)
    valid_before: StepStats | None = None
    valid_after: StepStats | None = None
    last_checkpoint: str | None = None
    preempted: bool = False
    skipped_steps: int = 0
    loss_scale_skips: int = 0  # fp16 steps the loss scaler skipped while calibrating its scale
    task_samples: dict[str, int] = field(default_factory=dict)  # training samples consumed per task
    best: dict | None = None  # model selection: metric, step, score and checkpoint of the best measurement
    stopped_early: bool = False  # train.early_stopping_patience measurements without improvement


@dataclass
class Run:
    """Everything the loop carries from step to step."""

    cfg: MegamftConfig
    state: TrainingState
    data: MultitaskData
    balancer: object
    static_weights: torch.Tensor
    metrics: MetricsWriter
    result: RunResult = field(default_factory=RunResult)
    iteration: int = 0
    consumed: int = 0
    skipped_in_a_row: int = 0
    async_saves: dist_checkpoint.AsyncSaves | None = None
    lora_base: dict | None = None  # base weights of adapter-only checkpoints
    coba_stream: list | None = None  # CoBa's sampled validation micro-batches on this rank, built once
    expert_stats: ExpertStats | None = None  # MoE: tokens per task and expert over the log interval
    selection: Selection | None = None  # checkpoint.keep_best and early stopping
    evaluator: CodeEvaluator | None = None  # eval.problems: pass@k at the training layout

    def finish_saves(self) -> None:
        if self.async_saves is not None:
            self.async_saves.wait()

    def abandon_saves(self) -> None:
        """A run that failed or was interrupted: no save still in flight is published or left behind."""
        if self.async_saves is not None:
            self.async_saves.abandon()


def _dp() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def validation_batches(data: MultitaskData, micro_batch_size: int) -> list[dict]:
    """Every task's validation sequences, sharded over DP in whole micro-batches.

    Each task's rows are topped up with empty (all-padding, unlearned) rows to a
    multiple of micro-batch x DP, so every layout measures the same tokens.
    Empty rows are masked out entirely, so they change no loss.
    """
    dp_rank, dp_size = _dp()
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    rows = []
    for task_rows in data.valid.values():
        padded = -(-len(task_rows) // (micro_batch_size * dp_size)) * micro_batch_size * dp_size
        share = padded // dp_size
        rows += [task_rows.row(r) if r < len(task_rows) else empty
                 for r in range(dp_rank * share, (dp_rank + 1) * share)]
    # The interleaved schedule wants a multiple of PP micro-batches.
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rows += [empty] * ((-(len(rows) // micro_batch_size) % pp) * micro_batch_size)
    return data.batches(rows, micro_batch_size, same_length=_pipelined())


def mixed_validation_batches(data: MultitaskData, micro_batch_size: int) -> list[dict]:
    """All tasks' validation sequences in one seeded, task-mixed order, sharded over DP in whole
    micro-batches (every rank gets as many; the last ones topped up with empty rows): the stream
    CoBa samples from, like MFTCoder's shuffled validation loader."""
    dp_rank, dp_size = _dp()
    rows = [task_rows.row(r) for task_rows in data.valid.values() for r in range(len(task_rows))]
    order = np.random.default_rng(data.cfg.seed).permutation(len(rows))
    per_rank = -(-len(rows) // (micro_batch_size * dp_size)) * micro_batch_size
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    mine = [rows[order[i]] if i < len(rows) else empty
            for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
    return data.batches(mine, micro_batch_size, same_length=_pipelined())


def _pipelined() -> bool:
    """Pipeline schedules need one sequence length for all micro-batches of a step."""
    return parallel_state.get_pipeline_model_parallel_world_size() > 1


def static_task_weights(cfg: MegamftConfig, task_names: tuple[str, ...]) -> torch.Tensor:
    problems = loss_weight_problems(cfg.loss, cfg.data, list(task_names))
    if problems:
        raise ConfigError(problems)
    return torch.tensor([cfg.loss.task_weights.get(name, 1.0) for name in task_names], dtype=torch.float64)


def _throughput(run: Run, stats: StepStats, seconds: float) -> dict:
    """tokens/s, TFLOP/s per device, MFU (when a peak is configured) and memory."""
    tokens_per_second = stats.tokens / max(seconds, 1e-9)
    # Model FLOPs count every token position computed, learned or not.
    rows_per_second = run.cfg.train.global_batch_size / max(seconds, 1e-9)
    tflops = tflops_per_device(run.cfg, run.state.vocab_size, rows_per_second, torch.distributed.get_world_size())
    values = {"tokens_per_second": tokens_per_second, "tflops_per_device": tflops, "memory_gb": memory_gb()}
    if run.cfg.train.peak_tflops_per_device:
        values["mfu"] = tflops / run.cfg.train.peak_tflops_per_device
    if stats.loss_scale is not None:
        values["loss_scale"] = stats.loss_scale
    return values


def _log_step(cfg: MegamftConfig, iteration: int, stats: StepStats, seconds: float, measured: dict,
              task_losses: dict[str, float | None]) -> None:
    """One line per log interval: the step's loss, each task's mean loss over the interval (`task_losses`),
    and `seconds`, the mean step time of the interval."""
    if not distributed.is_logging_rank():
        return
    eta = int(seconds * (cfg.train.train_steps - iteration))
    mfu = f" | MFU {measured['mfu']:.1%}" if "mfu" in measured else ""
    if stats.device_syncs is not None:  # counted under the CPU emulation, or on CUDA with MEGAMFT_COUNT_SYNCS=1
        mfu += f" | syncs {stats.device_syncs}"
    mfu += "".join(f" | {name} {value:.4g}" for name, value in stats.router_losses.items())
    grad = "skipped" if stats.skipped else f"{stats.grad_norm or 0.0:.3f}"
    log.info(
        "step %d/%d | loss %.4f | %s | grad-norm %s | lr %.2e | %.0f tok/s | %.2f TFLOP/s/dev%s | "
        "mem %.3g GB | eta %d:%02d",
        iteration, cfg.train.train_steps, stats.loss, format_task_losses(task_losses), grad,
        stats.lr or 0.0, measured["tokens_per_second"], measured["tflops_per_device"], mfu,
        measured["memory_gb"], eta // 60, eta % 60,
    )


def _validate(run: Run, label: str) -> StepStats | None:
    batches = validation_batches(run.data, run.cfg.train.micro_batch_size)
    if not batches:
        return None  # data.valid_samples_per_task=0: no validation set
    stats = evaluate(run.state, batches, run.data.task_names)
    if distributed.is_logging_rank():
        log.info("%s loss %.4f | %s", label, stats.loss, format_task_losses(present_task_losses(stats)))
        run.metrics.valid(run.iteration, stats)
    return stats


def _task_loss_tensor(stats: StepStats) -> torch.Tensor:
    return torch.tensor(list(stats.task_loss.values()), dtype=torch.float64)


def _loss_setup(run: Run) -> LossSetup:
    loss = run.cfg.loss
    weights = effective_task_weights(loss.mode, len(run.data.task_names), run.static_weights, run.balancer)
    m = run.cfg.model
    router = (m.moe_aux_loss_coeff, m.moe_z_loss_coeff) if m.num_experts else None
    return LossSetup(loss.mode, loss.normalization, weights, loss.focal_gamma, loss.fused_cross_entropy, router)


def _save(run: Run) -> None:
    extra = {"balancer": run.balancer.state_dict()} if run.balancer else {}
    extra["task_samples"] = dict(run.result.task_samples)
    if run.data.template is not None:  # what an export writes as its chat template
        extra["data_template"] = run.data.template
    extra["selection"] = run.selection.state_dict()
    path = dist_checkpoint.save(run.state, run.cfg.checkpoint.save_dir, run.iteration, run.consumed,
                                run.cfg, extra=extra, async_saves=run.async_saves,
                                lora_base=run.lora_base if run.cfg.lora.save_adapters_only else None,
                                data_identity=data_checks.checkpoint_data_identity(run.data),
                                keep=run.selection.kept(), best=run.selection.best_kept())
    run.result.last_checkpoint = str(path)


def _saved_now(run: Run) -> bool:
    return (run.result.last_checkpoint or "").endswith(f"{run.iteration:07d}")


def _save_unless_saved(run: Run) -> None:
    if run.cfg.checkpoint.save_dir and not _saved_now(run):
        _save(run)


def _after_step(run: Run, stats: StepStats) -> None:
    if run.balancer is None:
        return
    run.balancer.after_train_step(run.iteration, _task_loss_tensor(stats))
    step = run.iteration - 1  # the 0-based index of the step just done
    if run.cfg.loss.mode == "coba" and run.balancer.wants_validation(step):
        run.balancer.observe_validation(step, _coba_measurement(run, step))


def _coba_measurement(run: Run, step: int) -> torch.Tensor:
    """CoBa's per-task validation loss after `step`.

    sampled_batch: a few micro-batches, forward only; the result stays on the
    device (CoBa reads it at its next update: one device-to-host read per update,
    none during warm-up). full: the whole validation set, read at once.
    """
    loss = run.cfg.loss
    if loss.coba_validation == "full":
        return _task_loss_tensor(_validate(run, "coba valid"))
    if run.coba_stream is None:
        run.coba_stream = mixed_validation_batches(run.data, run.cfg.train.micro_batch_size)
    count, stream = loss.coba_valid_micro_batches, run.coba_stream
    # MFTCoder's cursor: sample i of the measurement after step s reads batch (count * s // interval + i).
    first = count * step // loss.coba_update_interval
    batches = [stream[(first + i) % len(stream)] for i in range(count)]
    return evaluate_task_loss(run.state, batches, len(run.data.task_names), loss.coba_valid_reduction)


def _start_coba(run: Run, valid_before: StepStats | None) -> None:
    """CoBa's normalizer: the per-task loss of the evaluation before step 0 (kept on resume)."""
    if run.cfg.loss.mode != "coba":
        return
    if valid_before is None:
        raise ConfigError("loss.mode=coba needs validation data: set data.valid_samples_per_task > 0")
    run.balancer.set_normalizer(_task_loss_tensor(valid_before))


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
            log.info("step %d skipped by the fp16 loss scaler: gradients overflowed, loss scale now %g "
                     "(expected while the scale calibrates; %d such steps so far)", run.iteration,
                     stats.loss_scale, run.result.loss_scale_skips)
        return
    run.skipped_in_a_row += 1
    run.result.skipped_steps += 1
    if distributed.is_logging_rank():
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", run.iteration, run.skipped_in_a_row)
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
        log.warning("step %d: the global batch holds no learned token (every loss mask is 0); nothing was learned",
                    run.iteration)
        return
    log.warning("step %d: the gradient norm is exactly 0 over %d learned tokens: the weights did not change. "
                "Check that the parameters are trainable and, with train.precision=fp16, the loss scale "
                "(optimizer.initial_loss_scale, optimizer.min_loss_scale)", run.iteration, stats.tokens)


def _progress_bar(run: Run):
    interactive = distributed.is_logging_rank() and sys.stderr.isatty()
    return tqdm(total=run.cfg.train.train_steps, initial=run.iteration, disable=not interactive,
                desc="train", unit="step", dynamic_ncols=True)


def _train_loop(run: Run, watch: PreemptionWatch) -> None:
    dp_rank, dp_size = _dp()
    with _progress_bar(run) as bar, _collect_garbage_every(run.cfg.train.gc_interval):
        _steps(run, dp_rank, dp_size, watch, bar)


@contextlib.contextmanager
def _collect_garbage_every(interval: int):
    """Python's collector off while training; `_steps` collects every `interval` steps (0: automatic)."""
    if not interval:
        yield
        return
    gc.collect()
    gc.freeze()  # what exists now (model, optimizer, data) is never scanned again
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _steps(run: Run, dp_rank: int, dp_size: int, watch: PreemptionWatch, bar) -> None:
    cfg = run.cfg
    window_start, window_steps, interval = time.perf_counter(), 0, TaskLossInterval()
    while run.iteration < cfg.train.train_steps:
        rows = run.data.train_rows(run.consumed, cfg.train.global_batch_size, dp_rank, dp_size)
        batches = run.data.batches(rows, cfg.train.micro_batch_size, same_length=_pipelined())
        if run.balancer is not None:
            run.balancer.before_step(run.iteration)
        with counting_syncs() as syncs:  # each one stalls the host until the GPU's queue drains
            stats = train_step(run.state, batches, run.data.task_names, _loss_setup(run))
        stats.device_syncs = syncs.value
        if syncs.value is not None:
            log.debug("step %d: %d device-to-host synchronizations", run.iteration + 1, syncs.value)
        if run.async_saves is not None:
            run.async_saves.poll()
        if cfg.train.gc_interval and (run.iteration + 1) % cfg.train.gc_interval == 0:
            gc.collect()
        _count_task_samples(run)
        run.iteration += 1
        run.consumed += cfg.train.global_batch_size
        kill_point("step.done", run.iteration)
        run.result.history.append(stats)
        bar.update()
        _check_skipped(run, stats)
        _after_step(run, stats)
        window_steps += 1
        interval.add(stats)
        seconds = (time.perf_counter() - window_start) / window_steps
        measured = _throughput(run, stats, seconds)
        if distributed.is_logging_rank():
            tokens_per_second = measured.pop("tokens_per_second")
            run.metrics.train(run.iteration, stats, tokens_per_second, measured)
            measured["tokens_per_second"] = tokens_per_second
        if run.iteration % cfg.train.log_interval == 0 or run.iteration == cfg.train.train_steps:
            _log_step(cfg, run.iteration, stats, seconds, measured, interval.means())
            _log_experts(run)
            window_start, window_steps = time.perf_counter(), 0
            interval.reset()
        validating = cfg.train.eval_interval and run.iteration % cfg.train.eval_interval == 0
        measure(run, _validate(run, "valid") if validating else None, _save_unless_saved)
        ckpt = cfg.checkpoint
        if ckpt.save_dir and ckpt.save_interval and run.iteration % ckpt.save_interval == 0 and not _saved_now(run):
            _save(run)
        if stops_early(run):
            return
        if watch.requested():
            run.result.preempted = True
            if ckpt.save_dir and not _saved_now(run):
                _save(run)
            if distributed.is_logging_rank():
                log.warning("preemption signal: stopped after step %d, checkpoint %s",
                            run.iteration, run.result.last_checkpoint)
            return


def _log_experts(run: Run) -> None:
    """Per-task expert statistics of the log interval (the one read of their device counts)."""
    if run.expert_stats is None:
        return
    counts = run.expert_stats.read()
    if not distributed.is_logging_rank():
        return
    shares = expert_shares(counts, run.data.task_names)
    run.metrics.experts(run.iteration, counts, shares, run.data.task_names)
    top = " | ".join(f"{task} " + ",".join(str(int(e)) for e in share.argsort(descending=True)[:3])
                     for task, share in shares.items())
    log.info("step %d experts (top 3 per task, all layers): %s", run.iteration, top)


def _count_task_samples(run: Run) -> None:
    """Add the samples of the global batch about to be consumed, per task (same on every rank)."""
    counts = run.result.task_samples
    for tasks, _ in run.data.train_rows(run.consumed, run.cfg.train.global_batch_size, 0, 1):
        for task in tasks.tolist():
            name = run.data.task_names[task]
            counts[name] = counts.get(name, 0) + 1


def _resume(run: Run, plan: run_folder.StartPlan) -> None:
    """Restore weights (and, resuming, iteration, consumed samples and balancer state) as planned."""
    if plan.load_dir is None:
        return
    _check_tokenizer(run.cfg, plan.load_dir)
    loaded = dist_checkpoint.load(run.state, plan.load_dir, run.cfg, load_optimizer=plan.load_optimizer,
                                  iteration=plan.iteration)
    # Adapter-only saves point at the weights under the adapters: the loaded checkpoint,
    # or, if that was adapter-only itself, its own base.
    run.lora_base = loaded.get(dist_checkpoint.LORA_BASE) or loaded["checkpoint"]
    if not plan.load_optimizer:
        return  # weights only: a fresh fine-tune from these weights
    run.iteration, run.consumed = loaded["progress"]["iteration"], loaded["progress"]["consumed_samples"]
    run.result.task_samples = dict(loaded.get("task_samples", {}))
    run.selection.load_state_dict(loaded.get("selection"))
    if run.balancer is not None and "balancer" in loaded:
        run.balancer.load_state_dict(loaded["balancer"])


def _claim_save_folder(cfg: MegamftConfig) -> tuple[FolderLock | None, run_folder.StartPlan]:
    """Rank 0 checks and locks checkpoint.save_dir and plans the start; every rank gets its answer
    and confirms it sees the same folder.

    Done before the model is built, so a wrong folder costs seconds, not a model load.
    """
    answer, lock = None, None
    if torch.distributed.get_rank() == 0:
        try:
            lock, plan = run_folder.claim(cfg)
            answer = ("ok", plan, lock.takeover if lock is not None else None)
        except (DestinationError, OSError, RuntimeError) as err:
            answer = ("error", f"{err}", None)
    shared = [answer]
    torch.distributed.broadcast_object_list(shared, src=0, group=distributed.host_group())
    status, detail, takeover = shared[0]
    if status == "error":
        raise DestinationError(detail)
    try:
        if cfg.checkpoint.save_dir:
            confirm_shared(cfg.checkpoint.save_dir, "checkpoint.save_dir")
    except BaseException as err:
        if lock is not None:
            lock.release()  # run() releases only the lock this function returns
        if isinstance(err, NotSharedError):
            raise DestinationError(f"{err}") from None
        raise
    if distributed.is_logging_rank():
        if takeover:
            log.warning("%s: took over the lock of a run that is gone (%s)", cfg.checkpoint.save_dir, takeover)
        log.info("%s", detail.reason)
    return lock, detail


def _build(cfg: MegamftConfig) -> Run:
    if cfg.loss.objective != "sft":
        raise ConfigError(f"loss.objective={cfg.loss.objective}: megamft train does not read preference pairs yet; "
                          "the objectives run through megamft.training.preference_step and megamft.data.pairs")
    runtime = distributed.runtime()
    if distributed.is_logging_rank():
        log.info(describe_runtime(runtime))
    if cfg.loss.fused_cross_entropy and runtime.cuda:  # on the CPU the torch path runs: nothing to build
        prepare_fused_kernels(distributed.local_rank(), distributed.is_logging_rank())
    backend = attention_backend_for(cfg, runtime.transformer_engine, runtime.transformer_engine_problem)
    if distributed.is_logging_rank():
        log.info("attention backend: %s (model.attention_backend=%s)", backend, cfg.model.attention_backend)
        if runtime.transformer_engine and backend != "te" and cfg.lora.quantize_base:
            log.info("QLoRA: megatron's local linears (the NF4 base) with torch attention instead of "
                     "Transformer Engine's layer")
    if backend == "torch":
        flash = activate_flash_attention(cfg.model.flash_attention_impl, runtime.cuda)
        if distributed.is_logging_rank():
            log.info("flash attention: %s", flash)
    elif cfg.model.flash_attention_impl and distributed.is_logging_rank():
        log.warning("model.flash_attention_impl=%s ignored: the %s backend does not run torch's flash kernels",
                    cfg.model.flash_attention_impl, backend)
    if cfg.parallel.context_parallel_size > 1 and backend != "te":
        raise ConfigError("parallel.context_parallel_size > 1 needs Transformer Engine's attention, without QLoRA: "
                         "the torch and local attention backends have no context parallelism "
                         "(pip install '.[gpu]' on a CUDA machine)")
    check_backend_honours_window(cfg, backend)
    if backend == "te" and cfg.data.mode == "pack" and cfg.train.micro_batch_size != 1:
        raise ConfigError("data.mode=pack with Transformer Engine needs train.micro_batch_size=1 (packed rows "
                         "go to TE as one 'thd' sequence); or use model.attention_backend=torch, or "
                         "data.mode=pad|dynamic")
    data = load_data(cfg.data, verify=distributed.local_rank() == 0,  # one checking rank per node
                     sharing=index_sharing(cfg.data))
    data_checks.report_unverified(data)
    data.packed_attention = PACKED_ATTENTION[backend]
    if cfg.model.vocab_size and cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"the tokenizer has {data.vocab_size} ids but model.vocab_size is "
            f"{cfg.model.vocab_size}; tokenize the data with the model's own tokenizer"
        )
    # Saved with every checkpoint, so an export knows the vocabulary without the tokenizer.
    cfg.model.vocab_size = cfg.model.vocab_size or data.vocab_size
    _check_token_ids(cfg, data)
    weights = static_task_weights(cfg, data.task_names)  # before the model: a mistake costs seconds
    selection, evaluator = Selection.from_config(cfg, data.task_names), CodeEvaluator.for_run(cfg, data.manifest)
    report_data(cfg, data, torch.distributed.get_rank())
    state = build_training_state(cfg, runtime, data.vocab_size, backend)
    if distributed.is_logging_rank():
        log.info("fast settings: %s", "; ".join(setting.describe() for setting in state.fast_settings))
    experts = None
    if cfg.model.num_experts:
        experts = ExpertStats(state.chunks, cfg.model.num_layers, len(data.task_names), cfg.model.num_experts,
                              cfg.parallel.sequence_parallel)
    return Run(cfg, state, data, make_balancer(cfg.loss, len(data.task_names)), weights,
               MetricsWriter.for_run(cfg, distributed.is_logging_rank(), data.vocab_size),
               async_saves=dist_checkpoint.AsyncSaves() if cfg.checkpoint.async_save else None,
               expert_stats=experts, selection=selection, evaluator=evaluator)


def _check_tokenizer(cfg: MegamftConfig, load_dir: str) -> None:
    """Preprocessed data must come from the model's own tokenizer (when both are known)."""
    if cfg.data.source != "indexed" or cfg.checkpoint.allow_config_change:
        return
    from megamft.data.manifest import load_manifest

    problem = run_folder.tokenizer_mismatch(load_manifest(Path(cfg.data.path)), load_dir)
    if problem:
        raise ConfigError(problem)


def _check_token_ids(cfg: MegamftConfig, data: MultitaskData) -> None:
    """Every id the data holds must be a row of the model's vocabulary, at any TP.

    An id past the vocabulary crashes at TP=1 but, at TP>1, falls into another
    rank's shard or the padding and trains silently on nothing meaningful.
    """
    largest = data.max_token_id
    if largest >= cfg.model.vocab_size:
        raise ConfigError(f"the data holds token id {largest}, but model.vocab_size is {cfg.model.vocab_size}: "
                         "tokenize the data with the model's own tokenizer (megamft-preprocess --tokenizer)")


def run(cfg: MegamftConfig, watch: PreemptionWatch | None = None) -> RunResult:
    """Train as configured; the process group is created and destroyed here.

    `watch` records preemption signals from start-up on (one is made here if not given);
    training stops at the first step boundary after one arrived.
    """
    lock, current = None, None
    watch = watch or PreemptionWatch(cfg.checkpoint.save_on_signal)
    try:
        distributed.initialize(cfg)
        lock, plan = _claim_save_folder(cfg)
        current = _build(cfg)
        _resume(current, plan)
        data_checks.wait_for_checksums(current.data)
        start = current.iteration
        if start >= cfg.train.train_steps and distributed.is_logging_rank():
            log.info("already at step %d of train.train_steps=%d: nothing to train", start, cfg.train.train_steps)
        current.result.valid_before = _validate(current, "valid (before)")
        _start_coba(current, current.result.valid_before)
        if cfg.eval.at_start and current.iteration == 0:
            evaluate_code(current, final=True)
        _train_loop(current, watch)
        if current.result.preempted:
            current.finish_saves()
            return current.result
        current.result.valid_after = _validate(current, "valid (after)")
        measure(current, current.result.valid_after, _save_unless_saved, final=True)
        if cfg.checkpoint.save_dir and current.iteration > start and not _saved_now(current):
            _save(current)
        current.finish_saves()
        current.result.best = best_summary(current.selection, cfg.checkpoint.save_dir)
        current.metrics.close()
        return current.result
    except Exception as err:
        quiet = distributed.claim_report(err)  # while the ranks are connected: one of them says it
        if quiet is None:
            raise
        raise quiet from err
    finally:
        if current is not None:
            current.abandon_saves()  # after finish_saves: nothing left (a failure or Ctrl-C: what was in flight)
        watch.close()
        if lock is not None:
            lock.release()
        distributed.shutdown()
