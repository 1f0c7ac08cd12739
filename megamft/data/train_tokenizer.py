"""Train a small sentencepiece BPE tokenizer on conversation JSON Lines (the embedded corpus's own).

Code-friendly settings: no text normalisation, whitespace kept as is, digits
split, byte fallback so any text round-trips; <s>, </s> and <pad> are
control tokens, as in Llama's tokenizer.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from megamft.data.conversation import parse_record


def conversation_texts(files: Iterable[Path]) -> Iterator[str]:
    """Every text of every record of the files (bad lines are skipped)."""
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                try:
                    sample = parse_record(json.loads(line))
                except ValueError:
                    continue
                yield from sample.contents()


def train_sentencepiece(
    files: list[Path],
    out: Path,
    vocab_size: int,
    specials: list[str] = (),
    max_texts: int = 200_000,
) -> Path:
    """Write `out` (a .model file) atomically; returns its path."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=conversation_texts(files),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9999,
        max_sentence_length=1 << 16,
        input_sentence_size=max_texts,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=200_000,
        num_threads=1,  # deterministic model for a given input
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=list(specials),
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(model.getvalue())
    os.replace(partial, out)
    return out
