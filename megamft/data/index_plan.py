"""What the training index starts from: each task's train/validation split, the validation rows, what the
data leaves out; and the cache key of the whole index.

Computed once (by the index builder, or in memory by every rank without a cache) and kept in two files of
the cache folder: `split.idx` (each task's training documents: as many entries as documents, read only
by whoever builds epochs) and `plan.idx` (small: validation rows, per-task training sizes, the coverage
record), which every rank reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamft.config import ConfigError, DataConfig
from megamft.data import coverage
from megamft.data.coverage import DataCoverage
from megamft.data.index_cache import FORMAT, IndexCache
from megamft.data.mixing import TaskMixture, quotas, sampling_weights, split_train_valid
from megamft.data.sequences import Rows, build_rows

INDEX_RULES = 1
"""Raised whenever the rules that compute the index (mixing, packing, split) change: a new cache key."""
_CONFIG_KEYS = (
    "seq_length",
    "mode",
    "pack_window",
    "task_sampling",
    "task_sampling_weights",
    "epoch_samples",
    "max_samples_per_task",
    "valid_samples_per_task",
    "seed",
)
"""The data section's fields the index depends on (not pad_to_multiple_of: dynamic lengths are chosen per
micro-batch when batches are made)."""


@dataclass
class Plan:
    """What every data epoch is computed from."""

    train_docs: list[np.ndarray]
    """Per task, its training documents (sorted)."""
    valid: list[Rows]
    """Per task, its validation sequences."""
    train_sizes: list[int]
    epoch_samples: int
    coverage: DataCoverage

    def weights(self, cfg: DataConfig, names: list[str]) -> np.ndarray:
        return sampling_weights(
            cfg.task_sampling, self.train_sizes, cfg.task_sampling_weights, names
        )

    def quota(self, cfg: DataConfig, names: list[str]) -> np.ndarray:
        return quotas(self.weights(cfg, names), self.epoch_samples)

    def mixture(self, cfg: DataConfig, names: list[str]) -> TaskMixture:
        return TaskMixture(self.train_docs, self.weights(cfg, names), self.epoch_samples, cfg.seed)


def check_sizes(cfg: DataConfig, names: list[str], stores: list) -> None:
    """Every task holds more samples than the validation split takes (cheap: every rank checks it)."""
    for name, store in zip(names, stores):
        if len(store.lengths) <= cfg.valid_samples_per_task:
            dropped = (
                (
                    f" (the embedded corpus left out {store.left_out} longer than data.seq_length + 1 tokens; "
                    "raise data.seq_length)"
                )
                if store.left_out
                else ""
            )
            raise ConfigError(
                f"task {name}: only {len(store.lengths)} samples{dropped}, not more than "
                f"data.valid_samples_per_task={cfg.valid_samples_per_task}; lower it or add data"
            )
        if len(store.lengths) >= 2**31:
            raise ConfigError(
                f"task {name}: {len(store.lengths):,} samples; a task holds at most 2^31 - 1 "
                "(split it into several tasks)"
            )


def compute_plan(cfg: DataConfig, names: list[str], stores: list) -> Plan:
    """The split, validation rows and coverage of the data."""
    splits, valid = [], []
    for task, store in enumerate(stores):
        train, held_out = split_train_valid(
            len(store.lengths), cfg.valid_samples_per_task, cfg.max_samples_per_task, cfg.seed, task
        )
        splits.append((train, held_out))
        valid.append(
            build_rows(
                np.full(len(held_out), task),
                held_out,
                store.lengths[held_out],
                cfg.mode,
                cfg.seq_length,
                cfg.pack_window,
                cfg.seed,
            )
        )
    train_docs = [train for train, _ in splits]
    sizes = [len(d) for d in train_docs]
    epoch_samples = cfg.epoch_samples or sum(sizes)
    quota = quotas(
        sampling_weights(cfg.task_sampling, sizes, cfg.task_sampling_weights, names), epoch_samples
    )
    for task, (docs, share) in enumerate(zip(train_docs, quota)):
        if share > 0 and len(docs) == 0:
            raise ValueError(f"task {names[task]} has a sampling weight but no training documents")
    measured = coverage.measure(cfg, names, stores, splits, quota, epoch_samples)
    return Plan(train_docs, valid, sizes, epoch_samples, measured)


def write_plan(cache: IndexCache, plan: Plan) -> None:
    """split.idx first, plan.idx last: a plan.idx on disk means both are whole."""
    cache.write(
        "split.idx", "split", {f"train.{t}": docs for t, docs in enumerate(plan.train_docs)}
    )
    arrays = {}
    for t, rows in enumerate(plan.valid):
        arrays |= {f"valid.{t}.tasks": rows.tasks, f"valid.{t}.docs": rows.docs}
        if rows.offsets is not None:
            arrays[f"valid.{t}.offsets"] = rows.offsets
    cache.write(
        "plan.idx",
        "plan",
        arrays,
        {
            "train_sizes": plan.train_sizes,
            "epoch_samples": plan.epoch_samples,
            "coverage": plan.coverage.record(),
            "tasks": len(plan.valid),
        },
    )


def read_plan(cache: IndexCache, split: bool) -> Plan:
    """The plan from the cache (IndexFileProblem if a file is missing, foreign or damaged); split=False
    leaves the training documents unread (empty lists) until `read_split`."""
    plan = cache.read("plan.idx", "plan")
    extra, arrays = plan.extra, plan.arrays
    valid = [
        Rows(
            arrays[f"valid.{t}.tasks"], arrays[f"valid.{t}.docs"], arrays.get(f"valid.{t}.offsets")
        )
        for t in range(int(extra["tasks"]))
    ]
    train_docs = read_split(cache, len(valid)) if split else []
    return Plan(
        train_docs,
        valid,
        [int(n) for n in extra["train_sizes"]],
        int(extra["epoch_samples"]),
        DataCoverage.from_record(extra["coverage"]),
    )


def read_split(cache: IndexCache, tasks: int) -> list[np.ndarray]:
    arrays = cache.read("split.idx", "split").arrays
    return [arrays[f"train.{t}"] for t in range(tasks)]


def cache_root(cfg: DataConfig) -> Path | None:
    """The folder holding the index caches of this data (data.index_cache, else <data.path>/index-cache);
    None for the embedded corpus, whose index is built in memory."""
    if cfg.source != "indexed":
        return None
    return Path(cfg.index_cache) if cfg.index_cache else Path(cfg.path) / "index-cache"


def cache_key(cfg: DataConfig, source: dict) -> tuple[str, dict]:
    """(sha256 hex, what it was made of) of the index for this data section and source identity."""
    described = {
        "format": FORMAT,
        "rules": INDEX_RULES,
        "source": source,
        "data": {k: getattr(cfg, k) for k in _CONFIG_KEYS},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest(), described


def folder_identity(folder: Path, manifest_file: Path, entries: list[dict]) -> dict:
    """A preprocessed folder as the index sees it: its manifest's bytes and each task's index files (size
    and time of change: a folder written again gives another key)."""
    files = {}
    for entry in entries:
        for key in ("prefix", "loss_mask_prefix"):
            stat = os.stat(folder / f"{entry[key]}.idx")
            files[f"{entry[key]}.idx"] = [stat.st_size, stat.st_mtime_ns]
    return {
        "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
        "files": files,
    }
