"""Render a conversation into token ids and a loss mask.

Layout: <s> then, per turn, a role token and the turn's text; each answer
ends with </s>. Only answer tokens and their </s> are learned.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamft.data.tokenizer import ByteTokenizer

ROLE_TOKENS = {"system": "<system>", "human": "<human>", "bot": "<bot>"}


@dataclass(frozen=True)
class TokenizedSample:
    """One conversation as ids with a 0/1 learn-this-token mask and its task."""

    ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    task_id: int


def render(turns: list[dict], tokenizer: ByteTokenizer, task_id: int) -> TokenizedSample:
    """turns: [{"role": "system"|"human"|"bot", "content": str}, ...]."""
    ids = [tokenizer.bos_id]
    mask = [0]
    for turn in turns:
        role = turn["role"]
        ids.append(tokenizer.special_id(ROLE_TOKENS[role]))
        mask.append(0)
        body = tokenizer.encode(turn["content"])
        learned = 1 if role == "bot" else 0
        if role == "bot":
            body.append(tokenizer.eos_id)
        ids.extend(body)
        mask.extend([learned] * len(body))
    return TokenizedSample(tuple(ids), tuple(mask), task_id)
