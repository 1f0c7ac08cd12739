"""Sample schemas: one JSON line -> a validated list of (role, content) turns.

Two schemas are read, and normalised to the roles system/user/assistant:
  MFTCoder:  {"chat_rounds": [{"role": "system"|"human"|"bot", "content": ...}, ...]}
  OpenAI:    {"messages":    [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
Roles must come in order: an optional system turn first, then user and
assistant turns alternating, ending with an answer. Every way a line can be
unusable raises BadSample with a short reason that
the caller prefixes with the file and line number.
"""

from __future__ import annotations

import json

ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
}
SCHEMA_KEYS = ("chat_rounds", "messages")
_SCHEMA_ROLES = {"chat_rounds": {"user": "human", "assistant": "bot"},
                 "messages": {"user": "user", "assistant": "assistant"}}

Turn = tuple[str, str]  # (role, content)


class BadSample(ValueError):
    """A line that cannot become a training sample; `kind` is its counted category."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def parse_line(raw: bytes) -> list[Turn]:
    """Decode, parse and validate one JSON line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("invalid_utf8", f"invalid UTF-8 at byte {err.start}") from None
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSample("malformed_json", f"malformed JSON ({err.msg} at column {err.colno})") from None
    return conversation_turns(sample)


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
            raise BadSample("bad_role_order", f"'{key}'[{index}]: role {found!r} where {names[expected]!r} must "
                            f"come (after an optional first system turn, {names['user']!r} and "
                            f"{names['assistant']!r} turns alternate, starting with {names['user']!r})")
    if roles[-1] != "assistant":
        raise BadSample("no_answer", f"'{key}': the conversation does not end with an answer")


def _turn(key: str, index: int, item) -> Turn:
    where = f"'{key}'[{index}]"
    if not isinstance(item, dict):
        raise BadSample("malformed_json", f"{where} must be an object with 'role' and 'content'")
    for field in ("role", "content"):
        if field not in item:
            raise BadSample("missing_field", f"{where} has no '{field}'")
    role, content = item["role"], item["content"]
    if not isinstance(role, str) or role not in ROLE_NAMES:
        raise BadSample("unknown_role", f"{where}: unknown role {role!r} (expected one of {sorted(ROLE_NAMES)})")
    if not isinstance(content, str):
        raise BadSample("malformed_json", f"{where}: 'content' must be a string")
    if not content.strip():
        raise BadSample("empty_field", f"{where}: empty 'content'")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON escape such as "\ud800" decodes to a lone surrogate
        raise BadSample("invalid_utf8", f"{where}: 'content' holds an unpaired surrogate "
                        f"\\u{ord(content[err.start]):04x}, which is not text") from None
    return ROLE_NAMES[role], content
