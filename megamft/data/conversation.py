"""Record formats: one JSON line -> a validated Sample.

Conversations, normalised to the roles system/user/assistant:
  MFTCoder:  {"chat_rounds": [{"role": "system"|"human"|"bot", "content": ...}, ...]}
  OpenAI:    {"messages":    [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
Roles must come in order: an optional system turn first, then user and
assistant turns alternating, ending with an answer.
MFTCoder's two-field records, {PROMPT: ..., ANSWER: ..., "system": optional}
(PAIR_FIELDS), are one question and its answer; {"text": ...} is a document
learned whole. Preference pairs: MFTCoder's {"chosen": [turns], "rejected":
[turns]}, the turns before the last shared (the prompt), and {"prompt": text or
[turns], "chosen": text, "rejected": text} (an answer may also be a list of one
assistant turn, as TRL's conversational format has it). A record matching several formats is refused rather than read
one way silently. Every way a line can be unusable raises BadSample with a
short reason that the caller prefixes with the file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "gpt": "assistant",  # MFTCoder's reader takes it for a bot turn
    "assistant": "assistant",
}
SCHEMA_KEYS = ("chat_rounds", "messages")
_SCHEMA_ROLES = {
    "chat_rounds": {"user": "human", "assistant": "bot"},
    "messages": {"user": "user", "assistant": "assistant"},
}
_SCHEMA_ROLES.update({key: _SCHEMA_ROLES["messages"] for key in ("chosen", "rejected", "prompt")})
PREFERENCE = "chosen/rejected"

# MFTCoder's two-field records (prompt field, answer field), in the order MFTCoder tries them.
PAIR_FIELDS = (
    ("prompt", "answer"),
    ("prompt", "response"),
    ("input", "output"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
)
TEXT_KEY = "text"

Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Sample:
    """One record: a conversation, or (form "text") one document learned whole.

    form is "chat" (chat_rounds or messages), "pair" (a two-field record, its
    system, prompt and answer as turns), "text" (`text` holds the document) or
    "preference" (`turns` end with the chosen answer, `rejected` is the other).
    """

    turns: tuple[Turn, ...] = ()
    form: str = "chat"
    text: str | None = None
    rejected: str | None = None

    def contents(self) -> list[str]:
        """Every text of the record (what decontamination looks at)."""
        if self.form == "text":
            return [self.text]
        return [content for _, content in self.turns] + (
            [self.rejected] if self.rejected is not None else []
        )

    def halves(self) -> tuple["Sample", "Sample"]:
        """A preference record's two conversations: the prompt with the chosen answer, then with the rejected."""
        return Sample(self.turns), Sample(self.turns[:-1] + (("assistant", self.rejected),))


def as_sample(sample) -> Sample:
    """A Sample, or a plain list of turns taken as a conversation."""
    return sample if isinstance(sample, Sample) else Sample(tuple(sample))


class BadSample(ValueError):
    """A line that cannot become a training sample; `kind` is its counted category."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def parse_line(raw: bytes) -> Sample:
    """Decode, parse and validate one JSON line of any record format."""
    return parse_record(load_line(raw))


def load_line(raw: bytes):
    """The JSON value of one line; BadSample if it is not UTF-8 or not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("invalid_utf8", f"invalid UTF-8 at byte {err.start}") from None
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSample(
            "malformed_json", f"malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    return sample


def record_formats(sample: dict) -> list[str]:
    """The formats whose fields a record has: 'chat_rounds', 'messages', 'prompt/answer', ..., 'text'."""
    found = [key for key in SCHEMA_KEYS if key in sample]
    found += [f"{p}/{a}" for p, a in PAIR_FIELDS if p in sample and a in sample]
    found += [PREFERENCE] if "chosen" in sample or "rejected" in sample else []
    return found + ([TEXT_KEY] if TEXT_KEY in sample else [])


def parse_record(sample) -> Sample:
    """The Sample of a parsed JSON record of any format."""
    if not isinstance(sample, dict):
        raise BadSample("malformed_json", "a sample must be a JSON object")
    formats = record_formats(sample)
    if not formats:
        raise BadSample(
            "missing_field",
            "no 'chat_rounds', 'messages' or 'text' field and no two-field pair ("
            + ", ".join(f"{p}/{a}" for p, a in PAIR_FIELDS)
            + ")",
        )
    if len(formats) > 1:
        raise BadSample(
            "ambiguous_record",
            f"fields of {len(formats)} formats ({', '.join(formats)}); keep the "
            f"fields of one (MFTCoder would silently read {_mftcoder_choice(formats)})",
        )
    form = formats[0]
    if ("/" not in form or form == PREFERENCE) and sample.get("system") not in (None, ""):
        raise BadSample(
            "misplaced_field",
            f"a top-level 'system' applies to two-field records only; in a "
            f"'{form}' record it would be ignored (give it as the first turn of a conversation)",
        )
    if form == TEXT_KEY:
        return Sample(form="text", text=_text(sample[TEXT_KEY], TEXT_KEY))
    if form == PREFERENCE:
        return preference_sample(sample)
    if "/" in form:  # a two-field record
        prompt, answer = form.split("/")
        system = sample.get("system")
        turns = [("system", _text(system, "system"))] if system not in (None, "") else []
        turns += [
            ("user", _text(sample[prompt], prompt)),
            ("assistant", _text(sample[answer], answer)),
        ]
        return Sample(tuple(turns), form="pair")
    return Sample(tuple(conversation_turns(sample)))


def _mftcoder_choice(formats: list[str]) -> str:
    """The format MFTCoder's reader takes for a record with several: pairs, then chat_rounds, then text."""
    order = [f"{p}/{a}" for p, a in PAIR_FIELDS] + ["chat_rounds", TEXT_KEY]
    known = [f for f in order if f in formats]
    return known[0] if known else "none of them"


def conversation_turns(sample) -> list[Turn]:
    """The turns of a parsed sample of either schema."""
    if not isinstance(sample, dict):
        raise BadSample("malformed_json", "a sample must be a JSON object")
    key = next((k for k in SCHEMA_KEYS if k in sample), None)
    if key is None:
        raise BadSample("missing_field", "no 'chat_rounds' or 'messages' field")
    rounds = sample[key]
    if not isinstance(rounds, list) or not rounds:
        raise BadSample("empty_field", f"'{key}' must be a non-empty list")
    turns = [_turn(key, i, r) for i, r in enumerate(rounds)]
    _check_role_order(key, [role for role, _ in turns])
    return turns


def _check_role_order(key: str, roles: list[str]) -> None:
    """System first if any, then user and assistant strictly alternating, ending with an answer.

    Every template relies on it: two user turns in a row would be trained as one
    prompt by some templates and refused by others (MFTCoder raises).
    """
    names = _SCHEMA_ROLES[key]
    start = 1 if roles[0] == "system" else 0
    for index in range(start, len(roles)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if roles[index] != expected:
            found = "system" if roles[index] == "system" else names[roles[index]]
            raise BadSample(
                "bad_role_order",
                f"'{key}'[{index}]: role {found!r} where {names[expected]!r} must "
                f"come (after an optional first system turn, {names['user']!r} and "
                f"{names['assistant']!r} turns alternate, starting with {names['user']!r})",
            )
    if roles[-1] != "assistant":
        raise BadSample("no_answer", f"'{key}': the conversation does not end with an answer")


def _turn(key: str, index: int, item) -> Turn:
    where = f"'{key}'[{index}]"
    if not isinstance(item, dict):
        raise BadSample("malformed_json", f"{where} must be an object with 'role' and 'content'")
    for field in ("role", "content"):
        if field not in item:
            raise BadSample("missing_field", f"{where} has no '{field}'")
    role = item["role"]
    if not isinstance(role, str) or role not in ROLE_NAMES:
        raise BadSample(
            "unknown_role", f"{where}: unknown role {role!r} (expected one of {sorted(ROLE_NAMES)})"
        )
    return ROLE_NAMES[role], _text(item["content"], "content", where)


def _text(value, field: str, where: str = "") -> str:
    """A field's text: a non-blank string of real characters."""
    where = f"{where}: " if where else ""
    if not isinstance(value, str):
        raise BadSample("malformed_json", f"{where}'{field}' must be a string")
    if not value.strip():
        raise BadSample("empty_field", f"{where}empty '{field}'")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON escape such as "\ud800" decodes to a lone surrogate
        raise BadSample(
            "invalid_utf8",
            f"{where}'{field}' holds an unpaired surrogate "
            f"\\u{ord(value[err.start]):04x}, which is not text",
        ) from None
    return value


def preference_sample(sample: dict) -> Sample:
    """A preference pair, either format; its prompt turns in order (see `_check_role_order`)."""
    for key in ("chosen", "rejected"):
        if key not in sample:
            raise BadSample(
                "missing_field",
                f"a preference record needs 'chosen' and 'rejected'; '{key}' is missing",
            )
    if "prompt" in sample:
        prompt = _prompt_turns(sample["prompt"])
        chosen, rejected = (_answer(sample[key], key) for key in ("chosen", "rejected"))
        _check_role_order("prompt", [role for role, _ in prompt] + ["assistant"])
    else:
        chosen_turns, rejected_turns = (
            _turn_list(sample[key], key) for key in ("chosen", "rejected")
        )
        prompt, chosen, rejected = chosen_turns[:-1], chosen_turns[-1][1], rejected_turns[-1][1]
        if rejected_turns[:-1] != prompt:
            raise BadSample(
                "different_prompts",
                "'chosen' and 'rejected' differ before their last turn; the two "
                "answers of a pair must follow the same prompt",
            )
    if chosen == rejected:
        raise BadSample(
            "identical_answers",
            "'chosen' and 'rejected' give the same answer: the pair teaches nothing",
        )
    return Sample(tuple(prompt) + (("assistant", chosen),), form="preference", rejected=rejected)


def _turn_list(value, key: str) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise BadSample("empty_field", f"'{key}' must be a non-empty list of turns")
    turns = [_turn(key, i, item) for i, item in enumerate(value)]
    _check_role_order(key, [role for role, _ in turns])
    return turns


def _prompt_turns(value) -> list[Turn]:
    if isinstance(value, str):
        return [("user", _text(value, "prompt"))]
    if not isinstance(value, list) or not value:
        raise BadSample("malformed_json", "'prompt' must be a string or a non-empty list of turns")
    return [_turn("prompt", i, item) for i, item in enumerate(value)]


def _answer(value, key: str) -> str:
    """An answer given as text, or as a list of one assistant turn."""
    if isinstance(value, list):
        turns = [_turn(key, i, item) for i, item in enumerate(value)]
        if len(turns) != 1 or turns[0][0] != "assistant":
            raise BadSample(
                "bad_role_order",
                f"'{key}' after a 'prompt' must be one answer: a string or a list of "
                "one assistant turn",
            )
        return turns[0][1]
    return _text(value, key)
