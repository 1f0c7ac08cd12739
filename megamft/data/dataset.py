"""The training and validation data of a run, per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamft.config import DataConfig
from megamft.data.batches import SampleTable, pad_samples
from megamft.data.stdlib_corpus import TASKS, build_corpus
from megamft.data.template import TokenizedSample, render
from megamft.data.tokenizer import ByteTokenizer


@dataclass
class MultitaskData:
    """Padded training samples of all tasks, and validation samples per task."""

    task_names: tuple[str, ...]
    train: SampleTable
    valid: dict[str, SampleTable]
    tokenizer: ByteTokenizer


def load_data(cfg: DataConfig) -> MultitaskData:
    """Build the configured source into training and per-task validation tables."""
    tokenizer = ByteTokenizer()
    per_task = cfg.max_samples_per_task or 10**9
    # Characters ~ byte tokens; leave room for role tokens and </s>.
    corpus = build_corpus(cfg.seq_length - 8, per_task + cfg.valid_samples_per_task, cfg.seed)
    train: list[TokenizedSample] = []
    valid: dict[str, SampleTable] = {}
    for task_id, task in enumerate(TASKS):
        rendered = (render(turns, tokenizer, task_id) for turns in corpus[task])
        # Characters were counted; non-ASCII text has more bytes: drop what does not fit whole.
        samples = [s for s in rendered if len(s.ids) <= cfg.seq_length + 1]
        if len(samples) <= cfg.valid_samples_per_task:
            raise ValueError(
                f"task {task}: only {len(samples)} samples fit data.seq_length={cfg.seq_length}; "
                "raise data.seq_length or lower data.valid_samples_per_task"
            )
        valid[task] = pad_samples(samples[: cfg.valid_samples_per_task], cfg.seq_length, tokenizer.pad_id)
        train.extend(samples[cfg.valid_samples_per_task :])
    return MultitaskData(TASKS, pad_samples(train, cfg.seq_length, tokenizer.pad_id), valid, tokenizer)


def tokens_in(table: SampleTable) -> int:
    """Learned (loss-mask) tokens in a table."""
    return int(torch.count_nonzero(table.loss_mask))
