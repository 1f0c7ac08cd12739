"""What the sequences leave out of the data: samples cut to data.seq_length, samples too short to learn
from, tasks that a data epoch never samples. Said at start-up and kept in the run's manifest.

A sample of L tokens fills L - 1 (input, label) positions. In every data.mode a
sample longer than a sequence keeps its first data.seq_length + 1 tokens
(seq_length positions) and loses the rest (sequences.collate): pack and concat
give it a sequence of its own, pad and dynamic cut it like any other. A
sample of fewer than 2 tokens has no position and is left out
(sequences.build_rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

EXACT_LIMIT = 2_000
"""Overlong samples whose loss masks are read one by one (50-150 us each from a local disk at 10^7
documents, more from a shared filesystem); past it, a seeded sample of them: the learned fraction of the cut
tokens is estimated with a standard error under 1.2%, and the start-up line says "about"."""


@dataclass
class CutCount:
    """Samples of some documents against one sequence length."""

    samples: int = 0
    tokens: int = 0
    longest: int = 0
    """Tokens of the longest sample."""
    overlong: int = 0
    """Samples longer than seq_length + 1 tokens: cut."""
    cut_tokens: int = 0
    """Tokens past the first seq_length + 1 of each overlong sample."""
    cut_learned: int = 0
    """Of those, tokens that carry a loss (loss mask 1): the answers lost."""
    nothing_learned: int = 0
    """Overlong samples whose kept part has no learned token: they train on nothing."""
    too_short: int = 0
    """Samples of fewer than 2 tokens: no position, left out."""
    estimated: bool = False
    """cut_learned and nothing_learned measured on a seeded sample of the overlong samples."""

    def add(self, other: "CutCount") -> None:
        for name in (
            "samples",
            "tokens",
            "overlong",
            "cut_tokens",
            "cut_learned",
            "nothing_learned",
            "too_short",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.longest = max(self.longest, other.longest)
        self.estimated = self.estimated or other.estimated


def count_cuts(
    store, docs: np.ndarray, seq_length: int, seed: int = 0, exact_limit: int = EXACT_LIMIT
) -> CutCount:
    """How the documents `docs` of `store` (lengths, loss_mask(doc), all_learned) fit sequences of
    seq_length positions; the learned tokens are counted on at most `exact_limit` overlong samples (a seeded
    choice, scaled). A store whose every token is learned (continued pretraining) needs no mask read: all the
    cut tokens were learned and every kept part (2 tokens or more) holds a learned one."""
    lengths = store.lengths[docs]
    keep = seq_length + 1
    over = docs[lengths > keep]
    count = CutCount(
        samples=len(docs),
        tokens=int(lengths.sum(dtype=np.int64)),
        longest=int(lengths.max(initial=0)),
        overlong=len(over),
        cut_tokens=int((lengths[lengths > keep] - keep).sum(dtype=np.int64)),
        too_short=int((lengths < 2).sum()),
    )
    if getattr(store, "all_learned", False):
        count.cut_learned = count.cut_tokens
        return count
    looked = over
    if len(over) > exact_limit:
        looked = np.random.default_rng(seed).choice(over, exact_limit, replace=False)
        count.estimated = True
    looked = np.sort(
        looked
    )  # the masks read in file order: sequential reads, not tens of thousands of seeks
    learned, emptied = 0, 0
    for doc in looked.tolist():
        mask = store.loss_mask(doc)
        learned += int(mask[keep:].sum(dtype=np.int64))
        emptied += int(not mask[1:keep].any() and mask[keep:].any())
    scale = len(over) / max(len(looked), 1)
    count.cut_learned, count.nothing_learned = round(learned * scale), round(emptied * scale)
    return count


@dataclass
class DataCoverage:
    """What a run's data gives its sequences (see the module docstring)."""

    seq_length: int
    train: CutCount = field(default_factory=CutCount)
    valid: CutCount = field(default_factory=CutCount)
    train_per_task: dict[str, CutCount] = field(default_factory=dict)
    left_out_by_source: dict[str, int] = field(default_factory=dict)
    """Samples the source left out before the split, per task (the embedded corpus drops samples longer
    than seq_length + 1 tokens)."""
    preprocess_cut: dict[str, int] = field(default_factory=dict)
    """Samples megamft-preprocess truncated, per task (--overlong truncate)."""
    preprocess_dropped: dict[str, int] = field(default_factory=dict)
    """Samples megamft-preprocess dropped for their length, per task (--overlong drop, or truncated to no answer)."""
    preprocess_split: dict[str, list[int]] = field(default_factory=dict)
    """Per task: samples megamft-preprocess cut into pieces (--overlong split), the pieces kept, and the pieces
    dropped for holding no learned token (a part of a prompt alone)."""
    preprocess_max_seq_length: int | None = None
    unsampled_tasks: dict[str, str] = field(default_factory=dict)
    """Tasks that no data epoch samples, and why."""

    def record(self) -> dict:
        """Plain data for the run's manifest."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "DataCoverage":
        """The coverage `record()` gave (read back from the index cache)."""
        fields = dict(record)
        for name in ("train", "valid"):
            fields[name] = CutCount(**fields[name])
        fields["train_per_task"] = {
            task: CutCount(**c) for task, c in fields["train_per_task"].items()
        }
        return cls(**fields)

    def lines(self) -> list[str]:
        """The start-up summary: one line on cut samples, one per other thing left out."""
        lines = [self._cut_line()]
        left = sum(self.left_out_by_source.values())
        if left:
            lines.append(
                f"the embedded corpus left out {left:,} sample(s) longer than data.seq_length + 1 = "
                f"{self.seq_length + 1} tokens ({_per_task(self.left_out_by_source)}): it is cut to fit "
                "data.seq_length in characters, and the template's markup made these longer in tokens"
            )
        cut, dropped = sum(self.preprocess_cut.values()), sum(self.preprocess_dropped.values())
        if cut or dropped:
            lines.append(
                f"megamft-preprocess already cut {cut:,} and dropped {dropped:,} sample(s) longer than "
                f"--max-seq-length {self.preprocess_max_seq_length} tokens (cut: "
                f"{_per_task(self.preprocess_cut) or 'none'}; dropped: "
                f"{_per_task(self.preprocess_dropped) or 'none'})"
            )
        split = {task: n for task, n in self.preprocess_split.items() if n[0]}
        if split:
            lines.append(
                f"megamft-preprocess split {sum(n[0] for n in split.values()):,} sample(s) longer than "
                f"--max-seq-length {self.preprocess_max_seq_length} tokens into "
                f"{sum(n[1] for n in split.values()):,} pieces, every label learned once ("
                + ", ".join(f"{task} {n[0]:,} into {n[1]:,}" for task, n in split.items())
                + ")"
                + (
                    f"; {sum(n[2] for n in split.values()):,} piece(s) holding no learned token dropped"
                    if any(n[2] for n in split.values())
                    else ""
                )
            )
        if self.train.too_short:
            lines.append(
                f"{self.train.too_short:,} training sample(s) of fewer than 2 tokens are left out "
                "(no position to learn)"
            )
        lines += [
            f"task {task} gets no training sample in any data epoch: {why}"
            for task, why in self.unsampled_tasks.items()
        ]
        return lines

    def _cut_line(self) -> str:
        t, s = self.train, self.seq_length
        if not t.overlong:
            return (
                f"no training sample exceeds data.seq_length={s} (+1 for the shifted label; the longest has "
                f"{t.longest:,} tokens)"
            )
        about = "about " if t.estimated else ""
        tasks = ", ".join(
            f"{name} {c.overlong:,}" for name, c in self.train_per_task.items() if c.overlong
        )
        emptied = (
            f"; {about}{t.nothing_learned:,} keep no learned token and train on nothing"
            if t.nothing_learned
            else ""
        )
        valid = (
            f" Validation samples cut too: {self.valid.overlong:,} of {self.valid.samples:,}."
            if self.valid.overlong
            else ""
        )
        return (
            f"{t.overlong:,} of {t.samples:,} training samples ({t.overlong / max(t.samples, 1):.1%}; {tasks}) "
            f"exceed data.seq_length={s} (+1 for the shifted label; the longest has {t.longest:,} tokens) and "
            f"keep their first {s + 1} tokens: {t.cut_tokens:,} tokens cut "
            f"({t.cut_tokens / max(t.tokens, 1):.1%} of all training tokens), {about}{t.cut_learned:,} of them "
            f"learned{emptied}.{valid} Raise data.seq_length, or cut them at preprocessing "
            f"(megamft-preprocess --max-seq-length {s + 1} --overlong split keeps every token, in pieces; "
            "--overlong truncate or drop)"
        )


def _per_task(counts: dict[str, int]) -> str:
    return ", ".join(f"{task} {n:,}" for task, n in counts.items() if n)


def measure(
    cfg,
    names: list[str],
    stores: list,
    splits: list[tuple[np.ndarray, np.ndarray]],
    quotas: np.ndarray,
    epoch_samples: int,
) -> DataCoverage:
    """The coverage of a run's data: `splits` holds each task's (train, valid) documents, `quotas` its
    samples per data epoch (mixing.TaskMixture); `cfg` is the DataConfig."""
    coverage = DataCoverage(cfg.seq_length)
    for name, store, (train, valid) in zip(names, stores, splits):
        counted = count_cuts(store, train, cfg.seq_length, cfg.seed)
        coverage.train.add(counted)
        coverage.train_per_task[name] = counted
        coverage.valid.add(count_cuts(store, valid, cfg.seq_length, cfg.seed))
        coverage.left_out_by_source[name] = store.left_out
        coverage.preprocess_cut[name] = store.preprocess_cut
        coverage.preprocess_dropped[name] = store.preprocess_dropped
        coverage.preprocess_split[name] = list(store.preprocess_split)
        coverage.preprocess_max_seq_length = store.preprocess_max_seq_length
    coverage.unsampled_tasks = unsampled_tasks(names, quotas, cfg.task_sampling, epoch_samples)
    return coverage


def unsampled_tasks(
    names: list[str], quotas: np.ndarray, sampling: str, epoch_samples: int
) -> dict[str, str]:
    """Tasks whose share of a data epoch rounds to no sample, with the keys that would change it."""
    why = {}
    for name, quota in zip(names, quotas.tolist()):
        if quota > 0:
            continue
        if sampling == "weights":
            why[name] = (
                f"data.task_sampling_weights gives it no share of the {epoch_samples:,} samples of an "
                "epoch; raise its weight, or data.epoch_samples"
            )
        else:
            why[name] = (
                f"its share of the {epoch_samples:,} samples of an epoch (data.task_sampling={sampling}) "
                "rounds to 0; raise data.epoch_samples, or use data.task_sampling=uniform"
            )
    return why
