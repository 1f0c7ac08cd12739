"""Tokenizers behind one small interface: byte-level, sentencepiece, Hugging Face.

Every tokenizer answers the same questions preprocessing needs: batch
encoding without special tokens, the ids a model's own tokenizer adds in
front of a text (`prefix_ids`: BOS for Llama, nothing for Qwen), its special
token strings (so template markup such as "<s>" or "<|im_end|>" becomes the
one id the model was trained with), and an identity for the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Protocol, Sequence

from megamft.errors import UserError


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be read: missing, of an unknown kind, or a file that is not what it claims."""


class Tokenizer(Protocol):
    vocab_size: int
    max_token_id: int  # the largest id it can emit (a tokenizer.json may place ids past vocab_size)
    files: tuple[Path, ...]  # the files it was read from
    eos_id: int
    pad_id: int
    prefix_ids: tuple[int, ...]
    specials: dict[str, int]  # special token string -> id
    parses_specials: (
        bool  # encode_batch itself turns special-token strings in a text into their ids
    )

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def identity(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; control tokens follow. Needs no training."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<system>", "<human>", "<bot>")
    parses_specials = False

    def __init__(self):
        self.specials = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.max_token_id = self.vocab_size - 1
        self.files: tuple[Path, ...] = ()
        self.pad_id = self.specials["<pad>"]
        self.bos_id = self.specials["<s>"]
        self.eos_id = self.specials["</s>"]
        self.prefix_ids = (self.bos_id,)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def identity(self) -> dict:
        return {
            "kind": "byte",
            "vocab_size": self.vocab_size,
            "max_token_id": self.max_token_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer:
    """A sentencepiece `.model` (CodeLlama, Llama 2 style): BOS in front, as the model's own.

    Samples are encoded a segment at a time, so encoding runs without the
    "dummy prefix" (the space sentencepiece puts before every text): else each
    segment would start with a spurious space (as transformers' non-legacy
    Llama tokenizer also avoids). Decoding uses the model unchanged.
    """

    parses_specials = False  # "<s>" in a text is three characters to sentencepiece

    def __init__(self, path: str | Path):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.path.read_bytes())
        except (
            RuntimeError,
            OSError,
        ) as err:  # sentencepiece's own, for a file it cannot parse or read
            raise TokenizerError(
                f"{self.path}: not a readable sentencepiece model ({err}); give the model's own "
                "tokenizer.model (a complete copy), or 'byte'"
            ) from err
        proto.normalizer_spec.add_dummy_prefix = False
        self._encoder = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = self._sp.get_piece_size()
        self.max_token_id = self.vocab_size - 1
        self.files = (self.path,)
        self.eos_id = self._sp.eos_id()
        bos = self._sp.bos_id()
        self.prefix_ids = (bos,) if bos >= 0 else ()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        # Control pieces ("<s>", "</s>") and user-defined ones ("<|im_end|>") are what
        # template markup may name; byte pieces ("<0x0A>") are not.
        self.specials = {
            piece: i
            for i, piece in ((i, self._sp.id_to_piece(i)) for i in range(self.vocab_size))
            if self._sp.is_control(i)
            or (
                piece.startswith("<")
                and piece.endswith(">")
                and len(piece) > 2
                and not self._sp.is_byte(i)
                and not self._sp.is_unknown(i)
            )
        }

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encoder.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def identity(self) -> dict:
        return {
            "kind": "sentencepiece",
            "file": self.path.name,
            "sha256": file_sha256(self.path),
            "vocab_size": self.vocab_size,
            "max_token_id": self.max_token_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (Qwen, DeepSeek style), with its `tokenizer_config.json` if beside it."""

    parses_specials = (
        True  # its added tokens are found in any text, as transformers' encode finds them
    )

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot parse
            raise TokenizerError(
                f"{self.path}: not a Hugging Face tokenizer.json ({err}); give the model's own "
                "tokenizer.json (a complete copy), a sentencepiece .model, or 'byte'"
            ) from err
        config_path = self.path.parent / "tokenizer_config.json"
        self.config = _read_json(config_path) if config_path.exists() else {}
        self.files = (self.path, config_path) if config_path.exists() else (self.path,)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Not vocab_size - 1: added tokens keep the ids the file gives them, which may lie past the count.
        self.max_token_id = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self.specials = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.prefix_ids = tuple(self._added_in_front())
        self.eos_id = self._special_id(
            self.config.get("eos_token"), ("</s>", "<|endoftext|>", "<|im_end|>")
        )
        bos = self._special_id(self.config.get("bos_token"), ("<s>",), required=False)
        self.bos_id = bos
        pad = self._special_id(self.config.get("pad_token"), (), required=False)
        self.pad_id = pad if pad is not None else self.eos_id

    def _added_in_front(self) -> list[int]:
        """What the tokenizer's post-processor puts before a text: the model's own BOS rule."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def _special_id(self, configured, fallbacks: tuple[str, ...], required: bool = True):
        if isinstance(configured, dict):  # {"content": "<s>", ...} in older configs
            configured = configured.get("content")
        for name in ((configured,) if configured else ()) + fallbacks:
            found = self._tok.token_to_id(name)
            if found is not None:
                return found
        if required:
            raise TokenizerError(
                f"{self.path}: no end-of-sequence token found (tried {configured or ''} {fallbacks}); "
                "give a tokenizer_config.json with eos_token beside tokenizer.json"
            )
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def identity(self) -> dict:
        out = {
            "kind": "huggingface",
            "file": self.path.name,
            "sha256": file_sha256(self.path),
            "vocab_size": self.vocab_size,
            "max_token_id": self.max_token_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }
        config_path = self.path.parent / "tokenizer_config.json"
        if config_path.exists():
            out["config_sha256"] = file_sha256(config_path)
        return out


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(
            f"{path}: not valid JSON ({err}); give the model's own tokenizer_config.json, "
            "or remove it"
        ) from None
    if not isinstance(loaded, dict):
        raise TokenizerError(
            f"{path}: expected a JSON object; give the model's own tokenizer_config.json"
        )
    return loaded


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', a sentencepiece `.model`, or a `tokenizer.json` (or the folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(
            f"tokenizer {spec!r} not found: give 'byte', a sentencepiece .model file, "
            "or a Hugging Face tokenizer.json (or its folder)"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json" or (path / "tokenizer.json").exists():
        return HFTokenizer(path)
    raise TokenizerError(f"tokenizer {spec!r}: expected a sentencepiece .model or a tokenizer.json")


def special_splitter(specials: dict[str, int]):
    """A function cutting markup text into plain pieces and special-token ids."""
    if not specials:
        return lambda text: [text] if text else []
    pattern = re.compile(
        "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    )

    def split(text: str) -> list[str | int]:
        pieces: list[str | int] = []
        for i, part in enumerate(pattern.split(text)):
            if i % 2:
                pieces.append(specials[part])
            elif part:
                pieces.append(part)
        return pieces

    return split
