"""`megamft train` with a preference objective (loss.objective dpo, rpo, orpo, simpo): the phases that differ.

The data's preference tasks hold pair k as documents 2k (chosen) and 2k+1 (rejected).
A `PairSchedule` picks each step's global batch of pairs from the step index alone
(a resumed run trains on the very pairs an uninterrupted one would), holding out
data.valid_samples_per_task pairs per task for validation. train.global_batch_size
and train.micro_batch_size count sequences, two per pair. Reference log-probabilities
(dpo, rpo) are computed once from the starting weights and stored in the run folder
(megamft.training.reference_logps); a resumed run reads them back. With data.mode=pack
each micro-batch's documents are packed into as few rows as hold them
(megamft.data.pairs.packed_pair_micro_batch); a step's micro-batches all get the
row count of its fullest one, on every DP rank, so megatron's schedule sees one shape.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megamft.checkpoint import dist_checkpoint
from megamft.checkpoint.layout import LATEST, latest_iteration
from megamft.config import ConfigError, MegamftConfig
from megamft.data.dataset import MultitaskData
from megamft.data.pairs import (
    PairSchedule,
    packed_pair_micro_batch,
    pair_micro_batch,
    split_pairs,
    step_rows,
)
from megamft.loss.preference import (
    NEEDS_REFERENCE,
    PairLogps,
    PreferenceSetup,
    batch_objective,
    metric_sums,
)
from megamft.platform import distributed
from megamft.training import data_checks, reference_logps
from megamft.training.preference_step import METRICS
from megamft.training.step import LossSetup, StepStats, train_step

log = logging.getLogger("megamft")

REFERENCE_MODEL = "reference_model"
"""The checkpoint entry naming the model the reference log-probabilities came from (read on resume)."""


@dataclass
class PreferenceRun:
    """What a preference run adds to `Run`: the objective, the pair schedule, the reference table."""

    setup: PreferenceSetup
    schedule: PairSchedule
    pairs_per_task: list[int]
    pairs_per_micro_batch: int
    length: int
    reference: dict[int, np.ndarray] | None = None  # per task, [pairs, 2]; dpo and rpo only
    reference_model: object = (
        None  # what the reference was computed from (saved with every checkpoint)
    )
    packed_attention: str | None = None
    """data.mode=pack: how packed rows reach the attention backend (PACKED_ATTENTION); None: padded rows."""

    def micro_batch(
        self, stores, pad_id: int, pairs: list[tuple[int, int]], rows=None, ref=None
    ) -> dict:
        """The micro-batch of `pairs`: padded rows, or packed into `rows` rows (None: as few as fit)."""
        if self.packed_attention is None:
            return pair_micro_batch(pairs, stores, self.length, pad_id, ref)
        return packed_pair_micro_batch(
            pairs, stores, self.length, pad_id, self.packed_attention, rows, ref
        )


def build(cfg: MegamftConfig, data: MultitaskData) -> PreferenceRun | None:
    """The run's pair schedule (None for sft); every pair must fit data.seq_length whole."""
    if cfg.loss.objective == "sft":
        return None
    loss, train = cfg.loss, cfg.train
    _check_lengths(cfg, data)
    pairs_per_task = [len(store.lengths) // 2 for store in data.stores]
    valid = cfg.data.valid_samples_per_task
    if any(count <= valid for count in pairs_per_task):
        raise ConfigError(
            f"data.valid_samples_per_task={valid} holds out that many pairs per task, but the tasks "
            f"have {dict(zip(data.task_names, pairs_per_task, strict=True))} pairs; lower it"
        )
    try:
        schedule = PairSchedule(pairs_per_task, valid, train.global_batch_size // 2, cfg.data.seed)
    except ValueError as err:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} (two sequences per pair): {err}"
        ) from None
    setup = PreferenceSetup(
        loss.objective, loss.beta, loss.label_smoothing, loss.rpo_alpha, loss.simpo_gamma
    )
    packed = data.packed_attention if cfg.data.mode == "pack" else None
    return PreferenceRun(
        setup,
        schedule,
        pairs_per_task,
        train.micro_batch_size // 2,
        cfg.data.seq_length,
        packed_attention=packed,
    )


def _check_lengths(cfg: MegamftConfig, data: MultitaskData) -> None:
    longest = max(int(store.lengths.max()) for store in data.stores if len(store.lengths))
    if (
        longest - 1 > cfg.data.seq_length
    ):  # a document of n tokens makes n-1 positions (inputs, labels)
        raise ConfigError(
            f"a preference document has {longest} tokens but data.seq_length is "
            f"{cfg.data.seq_length}: pairs are never cut; raise data.seq_length to {longest - 1} or "
            "preprocess with --max-seq-length and --overlong drop"
        )


def _micro_batch(run, pairs: list[tuple[int, int]], rows: int | None) -> dict:
    pref = run.preference
    ref = None
    if pref.reference is not None:
        ref = torch.from_numpy(np.stack([pref.reference[task][pair] for task, pair in pairs]))
    return pref.micro_batch(run.data.stores, run.data.pad_id, pairs, rows, ref)


def _my_micro_batches(run, pairs: list[tuple[int, int]]) -> list[dict]:
    """This DP rank's whole-pair micro-batches of a global batch of pairs (packed: all with the rows of
    the global batch's fullest micro-batch, `step_rows`)."""
    pref, size = run.preference, parallel_state.get_data_parallel_world_size()
    rows = None
    if pref.packed_attention is not None:
        rows = step_rows(pairs, run.data.stores, pref.length, size, pref.pairs_per_micro_batch)
    cuts = split_pairs(
        pairs, parallel_state.get_data_parallel_rank(), size, pref.pairs_per_micro_batch
    )
    return [_micro_batch(run, cut, rows) for cut in cuts]


def step_pairs(run) -> list[tuple[int, int]]:
    """The global batch of pairs of the next step, from the sequences consumed so far."""
    return run.preference.schedule.step(run.consumed // run.cfg.train.global_batch_size)


def train_one_step(run, setup: LossSetup) -> StepStats:
    """One optimizer step of the objective on the next global batch of pairs."""
    micro = _my_micro_batches(run, step_pairs(run))
    before_forward = run.expert_stats.route_tasks if run.expert_stats is not None else None
    return train_step(
        run.state,
        micro,
        run.data.task_names,
        dataclasses.replace(setup, preference=run.preference.setup),
        before_forward,
    )


def count_pairs(run) -> None:
    """Add the next step's pairs per task to the run's sample counts (the same on every rank)."""
    counts = run.result.task_samples
    for task, _ in step_pairs(run):
        name = run.data.task_names[task]
        counts[name] = counts.get(name, 0) + 1


def starting_model(cfg: MegamftConfig, load_dir: str | None) -> dict:
    """What the reference of a fresh run is: loss.reference_dir, the weights it loads, or its seeded
    initialization."""
    if cfg.loss.reference_dir:
        return {"reference_dir": str(Path(cfg.loss.reference_dir).resolve())}
    if load_dir:
        return {"load_dir": str(load_dir)}
    return {"initialized": cfg.train.seed, "model": dataclasses.asdict(cfg.model)}


def reference_command_problems(cfg: MegamftConfig) -> list[str]:
    """Why `megamft reference` cannot compute this config's reference table (one line each, naming the key)."""
    if cfg.loss.objective not in NEEDS_REFERENCE:
        return [
            f"loss.objective={cfg.loss.objective} has no reference log-probabilities (dpo and rpo "
            "have): megamft reference has nothing to compute; set loss.objective=dpo or rpo"
        ]
    problems = []
    if not cfg.checkpoint.save_dir:
        problems.append(
            "checkpoint.save_dir is not set: megamft reference stores the table there, for the "
            "megamft train of the same config to read"
        )
    problem = reference_dir_problem(cfg)
    return problems + ([problem] if problem else [])


def reference_dir_problem(cfg: MegamftConfig) -> str | None:
    """Why loss.reference_dir cannot give the reference (no complete checkpoint there), or None."""
    folder = cfg.loss.reference_dir
    if not folder or latest_iteration(folder) is not None:
        return None
    return (
        f"loss.reference_dir={folder} holds no complete checkpoint (no '{LATEST}' file): give the "
        "save folder of a run, or a conversion's output"
    )


def reference_from_checkpoint(run, fresh: bool) -> None:
    """loss.reference_dir on a fresh start: the stored table if checkpoint.save_dir holds it for this
    data and reference (`megamft reference`), else load the reference's weights and compute it now."""
    folder = run.cfg.loss.reference_dir
    if not folder or not fresh or run.preference.setup.objective not in NEEDS_REFERENCE:
        return
    model = starting_model(run.cfg, None)
    if _read_stored(run, model):
        return
    problem = reference_dir_problem(run.cfg)
    if problem:
        raise ConfigError(problem)
    if distributed.is_logging_rank():
        log.info("reference log-probabilities from loss.reference_dir=%s", folder)
    dist_checkpoint.load(run.state, folder, run.cfg, load_optimizer=False)
    attach_reference(run, model, fresh=True)


def _identity(run, model: dict) -> dict:
    """The stored table's key: the data and the model the reference is."""
    return {
        "data": data_checks.checkpoint_data_identity(run.data) or str(run.cfg.data.path),
        "model": model,
    }


def _read_stored(run, model: dict) -> bool:
    """Attach checkpoint.save_dir's table if it is there for this data and model (refused if for others)."""
    folder = run.cfg.checkpoint.save_dir
    stored = reference_logps.load(folder, _identity(run, model)) if folder else None
    if stored is None:
        return False
    run.preference.reference, run.preference.reference_model = stored, model
    _log_reference(run, computed=False)
    return True


def _log_reference(run, computed: bool) -> None:
    if distributed.is_logging_rank():
        log.info(
            "reference log-probabilities of %d pairs %s %s/%s",
            sum(run.preference.pairs_per_task),
            "computed and stored in" if computed else "read from",
            run.cfg.checkpoint.save_dir,
            reference_logps.FILE,
        )


def attach_reference(run, model: dict, fresh: bool) -> None:
    """Read or compute the reference table (dpo, rpo) before the first step; LoRA: the base, adapters off."""
    pref = run.preference
    pref.reference_model = model
    if pref.setup.objective not in NEEDS_REFERENCE or pref.reference is not None:
        return
    identity = _identity(run, model)
    lora = (
        run.cfg.lora.enabled and not run.cfg.loss.reference_dir
    )  # LoRA: the base is the starting model
    compute = lambda: _compute_reference(run, lora)  # noqa: E731
    folder = run.cfg.checkpoint.save_dir
    if not folder:
        pref.reference = compute()
        return
    pref.reference, computed = reference_logps.obtain(
        folder, identity, compute, may_compute=fresh or lora
    )
    _log_reference(run, computed)


def _compute_reference(run, lora: bool) -> dict[int, np.ndarray]:
    pref = run.preference
    pairs = [(task, k) for task, count in enumerate(pref.pairs_per_task) for k in range(count)]

    def compute():
        return _answer_logps(run, pairs)

    if not lora:
        return compute()
    with reference_logps.adapters_disabled(run.state.chunks[0].module):
        return compute()


def validate(run, label: str) -> StepStats | None:
    """The objective and preference metrics on the held-out pairs, under the model as it is now."""
    pref = run.preference
    pairs = pref.schedule.valid
    if not pairs:
        return None
    policy = _pair_table(run, pairs)
    reference = pref.reference
    ref = (
        torch.from_numpy(np.stack([reference[t][k] for t, k in pairs]))
        if reference is not None
        else torch.zeros(len(pairs), 2, dtype=torch.float64)
    )
    tokens = torch.tensor(
        [[_answer_tokens(run, t, 2 * k + h) for h in (0, 1)] for t, k in pairs], dtype=torch.float64
    )
    logps = PairLogps(policy[:, 0], policy[:, 1], tokens[:, 0], tokens[:, 1], ref[:, 0], ref[:, 1])
    tasks = torch.tensor([t for t, _ in pairs])
    num_tasks = len(run.data.task_names)
    loss = float(batch_objective(pref.setup, logps, tasks, num_tasks))
    sums = metric_sums(pref.setup, logps, tasks, num_tasks)
    metrics = {
        name: {
            task: float(sums[row, t] / sums[4, t]) if sums[4, t] else float("nan")
            for t, task in enumerate(run.data.task_names)
        }
        for row, name in enumerate(METRICS)
    }
    stats = StepStats(
        loss=loss, tokens=int(tokens.sum()), task_loss={}, task_tokens={}, preference=metrics
    )
    if distributed.is_logging_rank():
        log.info("%s loss %.4f | %s", label, loss, format_metrics(metrics))
        run.metrics.valid(run.iteration, stats)
    return stats


def _answer_tokens(run, task: int, doc: int) -> int:
    """Learned positions of a document (its loss mask, shifted as collate shifts it)."""
    return int(run.data.stores[task].loss_mask(doc)[1:].sum())


def _pair_table(run, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """[pairs, 2] log-probabilities of the answers under the current weights (every rank)."""
    table = _answer_logps(run, pairs)
    return torch.stack([torch.from_numpy(table[task][pair]) for task, pair in pairs])


def _answer_logps(run, pairs: list[tuple[int, int]]) -> dict[int, np.ndarray]:
    """Per task, [pairs, 2] log-probabilities of the answers of `pairs` under the current weights, one
    micro-batch per forward pass (packed into as few rows as it needs where data.mode is pack)."""
    pref = run.preference
    return reference_logps.compute(
        run.state,
        pairs,
        pref.pairs_per_task,
        lambda cut: pref.micro_batch(run.data.stores, run.data.pad_id, cut),
        pref.pairs_per_micro_batch,
        run.cfg.loss.fused_cross_entropy,
    )


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """'a acc 0.750 margin 0.123 | b ...': each task's preference accuracy and reward margin."""
    tasks = next(iter(metrics.values()), {})
    parts = []
    for task in tasks:
        acc, margin = metrics["rewards/accuracy"][task], metrics["rewards/margin"][task]
        parts.append(
            f"{task} absent" if math.isnan(acc) else f"{task} acc {acc:.3f} margin {margin:.4g}"
        )
    return " | ".join(parts)
