"""The training recipe: build, (resume), train, validate, save."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from megamft.checkpoint import dist_checkpoint, run_folder
from megamft.config import ConfigError, MegamftConfig
from megamft.config.preference_checks import packed_pairs_on_te
from megamft.config.task_weights import loss_weight_problems
from megamft.data.attention_boundaries import PACKED_ATTENTION
from megamft.data.dataset import MultitaskData, load_data
from megamft.loss.balancers import make_balancer
from megamft.model.attention import activate_flash_attention
from megamft.model.attention_window import check_backend_honours_window
from megamft.model.spec import attention_backend_for
from megamft.platform import distributed
from megamft.platform.device import describe_runtime
from megamft.platform.folder_lock import FolderLock
from megamft.platform.output_folder import DestinationError
from megamft.platform.shared_folder import NotSharedError, confirm_shared
from megamft.training import data_checks, preference_run, reference_logps, steps
from megamft.training.code_eval import CodeEvaluator
from megamft.training.data_report import report_data
from megamft.training.expert_stats import ExpertStats
from megamft.training.index_sharing import index_sharing
from megamft.training.kernel_startup import prepare_fused_kernels
from megamft.training.measurements import evaluate_code, measure
from megamft.training.metrics import MetricsWriter
from megamft.training.preemption import PreemptionWatch
from megamft.training.run_state import Run, RunResult
from megamft.training.saving import save, save_unless_saved, saved_now
from megamft.training.selection import Selection, best_summary
from megamft.training.setup import build_training_state
from megamft.training.validation import start_coba, validate

log = logging.getLogger("megamft")


def static_task_weights(cfg: MegamftConfig, task_names: tuple[str, ...]) -> torch.Tensor:
    problems = loss_weight_problems(cfg.loss, cfg.data, list(task_names))
    if problems:
        raise ConfigError(problems)
    return torch.tensor(
        [cfg.loss.task_weights.get(name, 1.0) for name in task_names], dtype=torch.float64
    )


def _progress_bar(run: Run):
    interactive = distributed.is_logging_rank() and sys.stderr.isatty()
    return tqdm(
        total=run.cfg.train.train_steps,
        initial=run.iteration,
        disable=not interactive,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def _train_loop(run: Run, watch: PreemptionWatch) -> None:
    with _progress_bar(run) as bar, _collect_garbage_every(run.cfg.train.gc_interval):
        steps.run_steps(run, watch, bar)


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


def _resume(run: Run, plan: run_folder.StartPlan) -> None:
    """Restore weights (and, resuming, iteration, consumed samples and balancer state) as planned;
    a preference run then reads or computes its reference log-probabilities."""
    if run.preference is not None:  # loss.reference_dir: computed before the starting weights load
        preference_run.reference_from_checkpoint(
            run, plan.load_dir is None or not plan.load_optimizer
        )
    loaded = _load(run, plan)
    if run.preference is not None:
        fresh = loaded is None or not plan.load_optimizer
        model = (
            preference_run.starting_model(run.cfg, plan.load_dir)
            if fresh
            else loaded.get(preference_run.REFERENCE_MODEL)
        )
        preference_run.attach_reference(run, model, fresh)


def _load(run: Run, plan: run_folder.StartPlan) -> dict | None:
    if plan.load_dir is None:
        return None
    _check_tokenizer(run.cfg, plan.load_dir)
    loaded = dist_checkpoint.load(
        run.state,
        plan.load_dir,
        run.cfg,
        load_optimizer=plan.load_optimizer,
        iteration=plan.iteration,
    )
    # Adapter-only saves point at the weights under the adapters: the loaded checkpoint,
    # or, if that was adapter-only itself, its own base.
    run.lora_base = loaded.get(dist_checkpoint.LORA_BASE) or loaded["checkpoint"]
    if not plan.load_optimizer:
        return loaded  # weights only: a fresh fine-tune from these weights
    run.iteration, run.consumed = (
        loaded["progress"]["iteration"],
        loaded["progress"]["consumed_samples"],
    )
    run.result.task_samples = dict(loaded.get("task_samples", {}))
    run.selection.load_state_dict(loaded.get("selection"))
    if run.balancer is not None and "balancer" in loaded:
        run.balancer.load_state_dict(loaded["balancer"])
    return loaded


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
            log.warning(
                "%s: took over the lock of a run that is gone (%s)",
                cfg.checkpoint.save_dir,
                takeover,
            )
        log.info("%s", detail.reason)
    return lock, detail


def _build(cfg: MegamftConfig, metrics: bool = True) -> Run:
    runtime = distributed.runtime()
    if distributed.is_logging_rank():
        log.info(describe_runtime(runtime))
    if (
        cfg.loss.fused_cross_entropy and runtime.cuda
    ):  # on the CPU the torch path runs: nothing to build
        prepare_fused_kernels(distributed.local_rank(), distributed.is_logging_rank())
    backend = attention_backend_for(
        cfg, runtime.transformer_engine, runtime.transformer_engine_problem
    )
    if distributed.is_logging_rank():
        log.info(
            "attention backend: %s (model.attention_backend=%s)",
            backend,
            cfg.model.attention_backend,
        )
        if runtime.transformer_engine and backend != "te" and cfg.lora.quantize_base:
            log.info(
                "QLoRA: megatron's local linears (the NF4 base) with torch attention instead of "
                "Transformer Engine's layer"
            )
    if backend == "torch":
        flash = activate_flash_attention(cfg.model.flash_attention_impl, runtime.cuda)
        if distributed.is_logging_rank():
            log.info("flash attention: %s", flash)
    elif cfg.model.flash_attention_impl and distributed.is_logging_rank():
        log.warning(
            "model.flash_attention_impl=%s ignored: the %s backend does not run torch's flash kernels",
            cfg.model.flash_attention_impl,
            backend,
        )
    if cfg.parallel.context_parallel_size > 1 and backend != "te":
        raise ConfigError(
            "parallel.context_parallel_size > 1 needs Transformer Engine's attention, without QLoRA: "
            "the torch and local attention backends have no context parallelism "
            "(pip install '.[gpu]' on a CUDA machine)"
        )
    check_backend_honours_window(cfg, backend)
    if backend == "te" and cfg.data.mode == "pack" and cfg.loss.objective != "sft":
        raise ConfigError(packed_pairs_on_te(cfg.loss.objective))
    if backend == "te" and cfg.data.mode == "pack" and cfg.train.micro_batch_size != 1:
        raise ConfigError(
            "data.mode=pack with Transformer Engine needs train.micro_batch_size=1 (packed rows "
            "go to TE as one 'thd' sequence); or use model.attention_backend=torch, or "
            "data.mode=pad|dynamic"
        )
    data = load_data(
        cfg.data,
        verify=distributed.local_rank() == 0,  # one checking rank per node
        sharing=index_sharing(cfg.data),
    )
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
    pairs = preference_run.build(cfg, data)
    selection, evaluator = (
        Selection.from_config(cfg, data.task_names),
        CodeEvaluator.for_run(cfg, data.manifest),
    )
    report_data(cfg, data, torch.distributed.get_rank())
    state = build_training_state(cfg, runtime, data.vocab_size, backend)
    if distributed.is_logging_rank():
        log.info(
            "fast settings: %s", "; ".join(setting.describe() for setting in state.fast_settings)
        )
    experts = None
    if cfg.model.num_experts:
        experts = ExpertStats(
            state.chunks,
            cfg.model.num_layers,
            len(data.task_names),
            cfg.model.num_experts,
            cfg.parallel.sequence_parallel,
        )
    return Run(
        cfg,
        state,
        data,
        make_balancer(cfg.loss, len(data.task_names)),
        weights,
        MetricsWriter.for_run(cfg, metrics and distributed.is_logging_rank(), data.vocab_size),
        async_saves=dist_checkpoint.AsyncSaves() if cfg.checkpoint.async_save else None,
        expert_stats=experts,
        selection=selection,
        evaluator=evaluator,
        preference=pairs,
    )


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
        raise ConfigError(
            f"the data holds token id {largest}, but model.vocab_size is {cfg.model.vocab_size}: "
            "tokenize the data with the model's own tokenizer (megamft-preprocess --tokenizer)"
        )


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
            log.info(
                "already at step %d of train.train_steps=%d: nothing to train",
                start,
                cfg.train.train_steps,
            )
        current.result.valid_before = validate(current, "valid (before)")
        start_coba(current, current.result.valid_before)
        if cfg.eval.at_start and current.iteration == 0:
            evaluate_code(current, final=True)
        _train_loop(current, watch)
        if current.result.preempted:
            current.finish_saves()
            return current.result
        current.result.valid_after = validate(current, "valid (after)")
        measure(current, current.result.valid_after, save_unless_saved, final=True)
        if cfg.checkpoint.save_dir and current.iteration > start and not saved_now(current):
            save(current)
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


def compute_reference(cfg: MegamftConfig) -> Path:
    """`megamft reference`: what `run` does up to its first step, for a fresh dpo or rpo run: compute
    its reference log-probabilities (loss.reference_dir's, or the starting model's) and store them in
    checkpoint.save_dir, where the run reads them back; nothing is trained or saved besides."""
    problems = preference_run.reference_command_problems(cfg)
    if problems:
        raise ConfigError(problems)
    lock = None
    try:
        distributed.initialize(cfg)
        lock, plan = _claim_save_folder(cfg)
        if plan.load_optimizer:
            raise ConfigError(
                f"checkpoint.save_dir={cfg.checkpoint.save_dir} holds the run's checkpoints (it would "
                "resume): its reference log-probabilities are stored already; choose another "
                "checkpoint.save_dir for a new run"
            )
        current = _build(cfg, metrics=False)
        _resume(current, plan)
        data_checks.wait_for_checksums(current.data)
        return Path(cfg.checkpoint.save_dir) / reference_logps.FILE
    except Exception as err:
        quiet = distributed.claim_report(err)
        if quiet is None:
            raise
        raise quiet from err
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown()
