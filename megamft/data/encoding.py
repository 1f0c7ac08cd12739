"""Segments of many conversations -> token ids and loss masks, with one batch encode call."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from megamft.data.templates import CONTENT, MARKUP, WHOLE, Segment
from megamft.data.tokenizer import special_splitter


@dataclass
class EncodedSample:
    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8: 1 where the token is learned


@dataclass
class EncodedBatch:
    """Many samples as one array of ids and one of mask values; sample i is offsets[i]:offsets[i+1]."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def samples(self) -> list[EncodedSample]:
        o = self.offsets
        return [
            EncodedSample(self.ids[o[i] : o[i + 1]], self.mask[o[i] : o[i + 1]])
            for i in range(len(o) - 1)
        ]


@dataclass
class SegmentEncoder:
    """Encodes template segments with a tokenizer; template markup is encoded once and cached."""

    tokenizer: object
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self._split = special_splitter(self.tokenizer.specials)
        self._whole = self.tokenizer.parses_specials

    def encode(self, conversations: list[list[Segment]]) -> EncodedBatch:
        texts: list[str] = []
        plans = [self._plan(segments, texts) for segments in conversations]
        encoded = self.tokenizer.encode_batch(texts) if texts else []
        chunks, flags, pieces = [], [], []
        for plan in plans:
            pieces.append(0)
            for parts, learned in plan:
                for part in parts:
                    chunks.append(encoded[part] if isinstance(part, int) else part)
                    flags.append(learned)
                    pieces[-1] += 1
        lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        ids = np.fromiter(chain.from_iterable(chunks), dtype=np.int32, count=int(lengths.sum()))
        mask = np.repeat(np.asarray(flags, dtype=np.uint8), lengths)
        piece_ends = np.cumsum(pieces, dtype=np.int64)  # (int even for a chunk without samples)
        token_ends = np.concatenate([[0], np.cumsum(lengths)])[piece_ends]
        return EncodedBatch(ids, mask, np.concatenate([[0], token_ends]).astype(np.int64))

    def _plan(self, segments: list[Segment], texts: list[str]) -> list[tuple[list, bool]]:
        """Each segment as (parts, learned); a part is an id list or an index into `texts`."""
        plan = []
        for piece, learned, kind in segments:
            if isinstance(piece, int):
                plan.append(([[piece]], learned))
            elif kind == MARKUP:
                plan.append(([self._markup_ids(piece)], learned))
            elif kind == CONTENT or (kind == WHOLE and self._whole):
                texts.append(piece)
                plan.append(([len(texts) - 1], learned))
            else:
                parts = []
                for part in self._split(piece):
                    if isinstance(part, int):
                        parts.append([part])
                    else:
                        texts.append(part)
                        parts.append(len(texts) - 1)
                plan.append((parts, learned))
        return plan

    def _markup_ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            pieces = self._split(text)
            plain = [p for p in pieces if isinstance(p, str)]
            encoded = iter(self.tokenizer.encode_batch(plain))
            ids = list(
                chain.from_iterable([p] if isinstance(p, int) else next(encoded) for p in pieces)
            )
            self._cache[text] = ids
        return ids
