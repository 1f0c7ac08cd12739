"""A byte-level tokenizer: needs no training and round-trips any text."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; role and control tokens follow."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<system>", "<human>", "<bot>")

    def __init__(self):
        self._special_ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIALS)

    @property
    def pad_id(self) -> int:
        return self._special_ids["<pad>"]

    @property
    def bos_id(self) -> int:
        return self._special_ids["<s>"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["</s>"]

    def special_id(self, name: str) -> int:
        return self._special_ids[name]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")
