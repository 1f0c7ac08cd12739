"""Prompts for code problems, tokenized exactly as megamft's training data is.

chat: the problem's prompt as the user turn of a one-turn conversation rendered by a
megamft template (mftcoder, chatml, llama2, or 'hf': the tokenizer's own chat template),
encoded segment by segment with megamft's preprocessing encoder; the prompt is every token
before the first learned one (the answer), i.e. what the model saw before each answer in
training. completion: the tokenizer's prefix (BOS where it adds one) and the prompt's text.
"""

from __future__ import annotations

from megamft.data.encoding import SegmentEncoder
from megamft.data.templates import get_template

_PLACEHOLDER = "pass"  # any answer: only the tokens before it are kept


class PromptBuilder:
    def __init__(self, tokenizer, fmt: str, template: str = "hf"):
        if fmt not in ("chat", "completion"):
            raise ValueError(f"prompt format must be 'chat' or 'completion', not {fmt!r}")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.encoder = SegmentEncoder(tokenizer)
        self.template = get_template(template, tokenizer)[0] if fmt == "chat" else None

    def ids(self, prompt: str) -> list[int]:
        if self.fmt == "completion":
            return [*self.tokenizer.prefix_ids, *self.tokenizer.encode_batch([prompt])[0]]
        segments = self.template([("user", prompt), ("assistant", _PLACEHOLDER)], self.tokenizer)
        sample = self.encoder.encode([segments]).samples()[0]
        learned = sample.mask.nonzero()[0]
        return sample.ids[: learned[0]].tolist()
