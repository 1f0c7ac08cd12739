"""The training and validation data of a run: documents per task, mixed, cut into sequences.

Sources:
  stdlib   the embedded corpus, built from Python's own library and encoded in memory
           with data.tokenizer and data.template
  indexed  a megamft-preprocess output folder (data.path), read with megatron-core's IndexedDataset
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from megamft.config import ConfigError, DataConfig
from megamft.config.task_weights import sampling_weight_problems
from megamft.data import index_plan
from megamft.data.attention_boundaries import add_document_boundaries
from megamft.data.conversation import ROLE_NAMES
from megamft.data.coverage import DataCoverage
from megamft.data.encoding import SegmentEncoder
from megamft.data.index_cache import IndexCache, IndexFileProblem, MissingIndexFile
from megamft.data.indexed import open_indexed
from megamft.data.integrity import check_task, largest_token_id
from megamft.data.manifest import CHECKSUMS, MANIFEST, load_manifest
from megamft.data.sequences import Rows, batch_length, collate
from megamft.data.templates import get_template
from megamft.data.tokenizer import load_tokenizer
from megamft.data.train_index import EpochSource, IndexSharing, Lazy, TrainIndex, epoch_rows
from megamft.data.verify import DataCheck

log = logging.getLogger("megamft")


class InMemoryDocuments:
    """Encoded documents held in lists; `left_out` counts those the source did not keep."""

    preprocess_cut = preprocess_dropped = 0
    preprocess_split = (0, 0, 0)
    preprocess_max_seq_length = None
    all_learned = False

    def __init__(self, ids: list[np.ndarray], masks: list[np.ndarray], left_out: int = 0):
        self._ids, self._masks = ids, masks
        self.lengths = np.asarray([len(i) for i in ids], dtype=np.int32)
        self.max_token_id = max((int(i.max()) for i in ids if len(i)), default=-1)
        self.left_out = left_out

    def get(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        return self._ids[doc], self._masks[doc]

    def loss_mask(self, doc: int) -> np.ndarray:
        return self._masks[doc]


class IndexedDocuments:
    """One task of a megamft-preprocess folder, through megatron-core's IndexedDataset.

    Its files are checked against the manifest first (integrity.check_task), so a
    damaged one is named now rather than failing a batch hours into training.
    megamft-preprocess truncated `preprocess_cut` samples to `preprocess_max_seq_length` tokens, dropped
    `preprocess_dropped` longer ones, and split `preprocess_split[0]` into `preprocess_split[1]` pieces (dropping
    `preprocess_split[2]` pieces that held no learned token).
    """

    left_out = 0

    def __init__(
        self, folder: Path, entry: dict, token_dtype: str, max_seq_length: int | None = None
    ):
        check_task(folder, entry, token_dtype)
        self.tokens = open_indexed(folder / entry["prefix"])
        self.masks = open_indexed(folder / entry["loss_mask_prefix"])
        self.lengths = (
            self.tokens.sequence_lengths
        )  # int32, a view of megatron's map of the .idx: no copy
        self.max_token_id = largest_token_id(folder, entry, token_dtype)
        self.preprocess_cut = int(entry.get("truncated", 0))
        # every token carries a loss (continued pretraining): the manifest counts them all learned
        self.all_learned = entry.get("learned_tokens", -1) == entry.get("tokens")
        dropped = entry.get("dropped") or {}
        self.preprocess_dropped = sum(
            int(dropped.get(k, 0)) for k in ("overlong", "no_answer_left_after_truncation")
        )
        self.preprocess_split = (
            int(entry.get("split", 0)),
            int(entry.get("pieces", 0)),
            int(dropped.get("piece_without_answer", 0)),
        )
        self.preprocess_max_seq_length = max_seq_length
        self._mask_bytes = None

    def get(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[doc], self.masks[doc]

    def loss_mask(self, doc: int) -> np.ndarray:
        """The document's loss mask, read straight from the map of its .bin (counting the samples cut to
        data.seq_length reads tens of thousands of them at start-up)."""
        if self._mask_bytes is None:
            self._mask_bytes = (
                np.memmap(self.masks.path_prefix + ".bin", dtype=np.uint8, mode="r").view(
                    np.ndarray
                )
                if self.masks.index.sequence_count
                else np.zeros(0, dtype=np.uint8)
            )  # plain: fast slices
        start = int(self.masks.index.sequence_pointers[doc])
        return self._mask_bytes[start : start + int(self.lengths[doc])]


@dataclass
class MultitaskData:
    """What training reads: per-task documents, training sequences, validation sequences per task."""

    task_names: tuple[str, ...]
    stores: list
    train: TrainIndex
    valid: dict[str, Rows]
    vocab_size: int
    pad_id: int
    cfg: DataConfig
    packed_attention: str = "mask"
    """How packed rows carry their document boundaries (data.sequences.PACKED_ATTENTION): 'mask', a dense
    [b, 1, s, s] mask (megatron's local attention); 'thd', PackedSeqParams for Transformer Engine (one row
    per micro-batch); 'rows', RowDocuments for the torch backend (no dense mask, any micro-batch size)."""
    max_token_id: int = -1
    """The largest id a training or validation sequence can hold (padding included): the model's
    vocabulary must have a row for it."""
    template: dict | None = None
    """The chat template the samples were rendered with (name, Jinja source): saved with every
    checkpoint so that an export carries it."""
    coverage: DataCoverage | None = None
    """What the sequences leave out (cut samples, unsampled tasks): said at start-up, kept in the run's manifest."""
    manifest: dict | None = None
    """data.source=indexed: the folder's manifest (its checksums make the data's identity)."""
    checksums: DataCheck | None = None
    """data.source=indexed, when asked for: the check of the files' content, running in the background."""

    def batches(
        self,
        rows: list[tuple[np.ndarray, np.ndarray]],
        micro_batch_size: int,
        same_length: bool = False,
    ) -> list[dict]:
        """Micro-batches of the rows, in order. same_length: one length for all (pipeline parallel)."""
        cut = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        if self.cfg.mode != "dynamic":
            lengths = [self.cfg.seq_length] * len(cut)
        else:
            lengths = [
                batch_length(c, self.stores, self.cfg.seq_length, self.cfg.pad_to_multiple_of)
                for c in cut
            ]
            if same_length:
                lengths = [max(lengths)] * len(cut)
        dense = self.packed_attention == "mask"
        batches = [
            collate(c, self.stores, self.cfg.mode, n, self.pad_id, dense)
            for c, n in zip(cut, lengths)
        ]
        if self.cfg.mode == "pack":
            for batch in batches:
                add_document_boundaries(batch, self.packed_attention)
        return batches

    def train_rows(self, consumed: int, global_batch_size: int, dp_rank: int, dp_size: int) -> list:
        """This DP rank's contiguous share of the global batch after `consumed` sequences."""
        share = global_batch_size // dp_size
        start = consumed + dp_rank * share
        return [self.train.row(p) for p in range(start, start + share)]


def load_data(
    cfg: DataConfig, sharing: IndexSharing | None = None, verify: bool = False
) -> MultitaskData:
    """The configured source as training and per-task validation sequences.

    verify: start checking an indexed folder's files against their checksums (data.verify), in the
    background; `MultitaskData.checksums.problem()` waits for the answer. Manifests without checksums
    are not checked.

    `sharing` says whether this process builds the index cache or reads what its builder wrote (training's
    start-up decides; alone, a process builds). Every rank calls it; the builder writes the plan and the
    first data epoch before `sharing.wait()` lets the others read them."""
    sharing = sharing or IndexSharing()
    manifest = identity = checksums = None
    if cfg.source == "indexed":
        names, stores, vocab_size, pad_id, template, manifest, identity = _indexed_source(cfg)
    else:
        names, stores, vocab_size, pad_id, template = _stdlib_source(cfg)
    names = list(names)
    if verify and manifest is not None and CHECKSUMS in manifest:
        checksums = DataCheck(Path(cfg.path), manifest, cfg.verify)
    max_token_id = max([pad_id, *(store.max_token_id for store in stores)])
    problems = sampling_weight_problems(cfg, names)
    if problems:
        raise ConfigError(problems)
    index_plan.check_sizes(cfg, names, stores)
    cache = _cache(cfg, identity, sharing)
    plan, train, failure = None, None, None
    if cache is not None and sharing.builder:
        try:
            plan = _builder_plan(cfg, names, stores, cache, sharing)
            train = _train_index(cfg, names, stores, plan, cache, sharing)
            train.epoch(0)  # written now; the next one is prepared in the background
        except BaseException as err:  # raised once the others are let go
            failure = err
    sharing.wait()
    if failure is not None:
        raise failure
    if plan is None:
        plan = _reader_plan(cfg, names, stores, cache, sharing)
        train = _train_index(cfg, names, stores, plan, cache, sharing)
    return MultitaskData(
        tuple(names),
        stores,
        train,
        dict(zip(names, plan.valid)),
        vocab_size,
        pad_id,
        cfg,
        max_token_id=max_token_id,
        template=template,
        manifest=manifest,
        checksums=checksums,
        coverage=plan.coverage,
    )


def _cache(cfg: DataConfig, identity: dict | None, sharing: IndexSharing) -> IndexCache | None:
    """The index cache of this data and data section; None: built in memory (the embedded corpus, or a
    folder that cannot be written)."""
    if identity is None or not sharing.use_cache:
        return None
    root = index_plan.cache_root(cfg)
    key, described = index_plan.cache_key(cfg, identity)
    cache = IndexCache(root, key, described)
    if sharing.builder:
        try:
            cache.prepare()
        except OSError as err:
            if sharing.speaks:
                log.warning(
                    "data.index_cache=%s cannot be written (%s): the training index is built in memory "
                    "on every rank; set data.index_cache to a writable folder",
                    root,
                    err.strerror or err,
                )
            return None
    return cache


def _builder_plan(
    cfg: DataConfig, names: list[str], stores: list, cache: IndexCache, sharing: IndexSharing
) -> index_plan.Plan:
    """The plan from the cache when it is whole, else computed and written (and read back, mapped)."""
    try:
        return index_plan.read_plan(cache, split=True)
    except MissingIndexFile:
        pass
    except IndexFileProblem as err:
        if sharing.speaks:
            log.warning("%s; building the training index again", err)
    plan = index_plan.compute_plan(cfg, names, stores)
    try:
        index_plan.write_plan(cache, plan)
        return index_plan.read_plan(cache, split=True)
    except OSError as err:
        if sharing.speaks:
            log.warning(
                "the training index could not be written to %s (%s): every rank builds it in memory",
                cache.folder,
                err.strerror or err,
            )
        return plan


def _reader_plan(
    cfg: DataConfig, names: list[str], stores: list, cache: IndexCache | None, sharing: IndexSharing
) -> index_plan.Plan:
    if cache is not None:
        try:
            return index_plan.read_plan(cache, split=False)
        except IndexFileProblem as err:
            if sharing.speaks:
                log.warning("%s: the training index is built in memory here", err)
    return index_plan.compute_plan(cfg, names, stores)


def _train_index(
    cfg: DataConfig,
    names: list[str],
    stores: list,
    plan: index_plan.Plan,
    cache: IndexCache | None,
    sharing: IndexSharing,
) -> TrainIndex:
    def mixture():
        if not plan.train_docs:  # a reader of the cache: the split is read when first needed
            plan.train_docs = index_plan.read_split(cache, len(names))
        return plan.mixture(cfg, names)

    def build(epoch: int) -> Rows:
        # The lengths are read through the stores, which keep megatron's maps open (its reader closes
        # its map when collected, whatever views of it remain).
        return epoch_rows(
            mixed.get(),
            [store.lengths for store in stores],
            cfg.mode,
            cfg.seq_length,
            cfg.pack_window,
            cfg.seed,
            epoch,
        )

    mixed = Lazy(mixture)
    source = EpochSource(build, cache, sharing)
    return TrainIndex(source, plan.quota(cfg, names), mixed)


def _indexed_source(cfg: DataConfig):
    folder = Path(cfg.path)
    manifest = load_manifest(folder)
    entries = sorted(manifest["tasks"], key=lambda e: e["id"])
    cut_to = (manifest.get("options") or {}).get("max_seq_length")
    stores = [IndexedDocuments(folder, e, manifest["token_dtype"], cut_to) for e in entries]
    tokenizer = manifest["tokenizer"]
    vocab_size = _vocabulary(tokenizer["vocab_size"], tokenizer.get("max_token_id"))
    identity = index_plan.folder_identity(folder, folder / MANIFEST, entries)
    return (
        [e["name"] for e in entries],
        stores,
        vocab_size,
        int(tokenizer.get("pad_id", 0)),
        manifest.get("template"),
        manifest,
        identity,
    )


def _vocabulary(vocab_size: int, max_token_id) -> int:
    """Rows a model needs for every id the tokenizer can emit (a tokenizer.json may place ids past its size)."""
    return (
        max(int(vocab_size), int(max_token_id) + 1) if max_token_id is not None else int(vocab_size)
    )


@lru_cache(maxsize=4)
def _stdlib_source_cached(
    seq_length: int, per_task: int, seed: int, tokenizer_spec: str, template_name: str
):
    from megamft.data.stdlib_corpus import TASKS, build_corpus

    tokenizer = load_tokenizer(tokenizer_spec)
    template, identity = get_template(template_name, tokenizer)
    encoder = SegmentEncoder(tokenizer)
    # Characters ~ tokens at most; leave room for the template's markup.
    corpus = build_corpus(seq_length - 8, per_task, seed)
    stores = []
    for task in TASKS:
        conversations = [
            [(ROLE_NAMES[t["role"]], t["content"]) for t in turns] for turns in corpus[task]
        ]
        samples = list(encoder.encode([template(c, tokenizer) for c in conversations]).samples())
        encoded = [s for s in samples if len(s.ids) <= seq_length + 1]
        stores.append(
            InMemoryDocuments(
                [s.ids for s in encoded],
                [s.mask for s in encoded],
                left_out=len(samples) - len(encoded),
            )
        )
    return (
        list(TASKS),
        stores,
        _vocabulary(tokenizer.vocab_size, tokenizer.max_token_id),
        tokenizer.pad_id,
        identity,
    )


def _stdlib_source(cfg: DataConfig):
    per_task = (cfg.max_samples_per_task or 10**9) + cfg.valid_samples_per_task
    return _stdlib_source_cached(cfg.seq_length, per_task, cfg.seed, cfg.tokenizer, cfg.template)
