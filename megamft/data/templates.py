"""Chat templates: a sample -> segments of text, each learned or not.

A segment is (piece, learned, kind). `piece` is text or a token id; kind says
how text becomes ids: CONTENT is a turn's own text, encoded as is; MARKUP is
the template's fixed text (special-token strings in it become their ids, and
its encoding is cached); RENDERED is template output mixed with content
(special-token strings become ids, no cache); WHOLE is a string encoded by one
tokenizer call, as MFTCoder encodes (a Hugging Face tokenizer finds the
special-token strings in it itself; others have them split out first). Only
assistant content and the end-of-turn token are learned; a `text` record is
learned whole.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from megamft.data.chat_templates import builtin_chat_template
from megamft.data.conversation import BadSample, Sample, Turn, as_sample
from megamft.errors import UserError

CONTENT, MARKUP, RENDERED, WHOLE = 0, 1, 2, 3
Segment = tuple  # (str | int, bool, int)
TemplateFn = Callable[["Sample | list[Turn]", "object"], list[Segment]]
MFTCODER_TAGS = {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"}


class TemplateError(UserError, ValueError):
    """A chat template that cannot be used as asked (unknown name, or none in the tokenizer)."""


def mftcoder_content(text: str) -> str:
    """A content as MFTCoder encodes it: no-break spaces made plain, a newline appended."""
    return text.replace("\u202f", " ").replace("\xa0", " ") + "\n"


def mftcoder(sample: Sample | list[Turn], tokenizer) -> list[Segment]:
    """MFTCoder's preprocessing (mftcoder_accelerate/src/data/preprocess_data.py), string for string.

    Encoded separately, as MFTCoder does: a conversation's system turn
    "<s>system\\n{s}\\n"; each question with the tags around it,
    "<s>human\\n{q}\\n<s>bot\\n"; each answer "{a}\\n" and EOS (learned); then "\\n".
    A two-field record encodes its system with its question and has no "\\n"
    after the EOS; a text record is "{t}\\n" and EOS, all learned. The tags'
    "<s>" is the BOS token where the tokenizer has one; no other BOS is added.
    """
    sample = as_sample(sample)
    end = (tokenizer.eos_id, True, MARKUP)
    if sample.form == "text":
        return [(mftcoder_content(sample.text), True, WHOLE), end]
    turns = list(sample.turns)
    system = (
        MFTCODER_TAGS["system"] + mftcoder_content(turns.pop(0)[1])
        if turns[0][0] == "system"
        else ""
    )
    segments: list[Segment] = []
    if system and sample.form == "chat":
        segments.append((system, False, WHOLE))
        system = ""
    for role, content in turns:
        if role == "user":
            question = (
                system
                + MFTCODER_TAGS["user"]
                + mftcoder_content(content)
                + MFTCODER_TAGS["assistant"]
            )
            segments.append((question, False, WHOLE))
            system = ""
        else:
            segments += [(mftcoder_content(content), True, WHOLE), end]
            if sample.form == "chat":
                segments.append(("\n", False, MARKUP))
    return segments


def document(sample: Sample, tokenizer) -> list[Segment]:
    """A text record under any template but mftcoder: the model's own prefix (BOS), the text, EOS; all learned."""
    return [(i, True, MARKUP) for i in tokenizer.prefix_ids] + [
        (sample.text, True, CONTENT),
        (tokenizer.eos_id, True, MARKUP),
    ]


def chatml(sample: Sample | list[Turn], tokenizer) -> list[Segment]:
    """ChatML: <|im_start|>role\\n ... <|im_end|>\\n; the answer's <|im_end|> is learned."""
    sample = as_sample(sample)
    if sample.form == "text":
        return document(sample, tokenizer)
    segments: list[Segment] = [(i, False, MARKUP) for i in tokenizer.prefix_ids]
    for role, content in sample.turns:
        learned = role == "assistant"
        segments += [
            (f"<|im_start|>{role}\n", False, MARKUP),
            (content, learned, CONTENT),
            ("<|im_end|>", learned, MARKUP),
            ("\n", False, MARKUP),
        ]
    return segments


def llama2(sample: Sample | list[Turn], tokenizer) -> list[Segment]:
    """Llama 2 chat: <s>[INST] <<SYS>>..<</SYS>> user [/INST] answer </s> per round."""
    sample = as_sample(sample)
    if sample.form == "text":
        return document(sample, tokenizer)
    turns = sample.turns
    system = turns[0][1] if turns[0][0] == "system" else None
    rounds = turns[1:] if system is not None else turns
    roles = [role for role, _ in rounds]
    if roles != ["user", "assistant"] * (len(rounds) // 2) or len(rounds) % 2:
        raise BadSample(
            "bad_conversation", "template llama2 needs user/assistant turns in alternation"
        )
    segments: list[Segment] = []
    for index in range(0, len(rounds), 2):
        segments += [(i, False, MARKUP) for i in tokenizer.prefix_ids]
        segments.append(("[INST] ", False, MARKUP))
        if index == 0 and system is not None:
            segments += [
                ("<<SYS>>\n", False, MARKUP),
                (system, False, CONTENT),
                ("\n<</SYS>>\n\n", False, MARKUP),
            ]
        segments += [
            (rounds[index][1], False, CONTENT),
            (" [/INST]", False, MARKUP),
            (rounds[index + 1][1], True, CONTENT),
            (tokenizer.eos_id, True, MARKUP),
        ]
    return segments


class HFChatTemplate:
    """The `chat_template` of a tokenizer_config.json, rendered with jinja2 as transformers does.

    Answer spans are found by rendering growing prefixes of the conversation:
    the text an assistant turn adds after the generation prompt is learned.
    """

    def __init__(self, source: str, config: dict):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise BadSample("template_error", f"chat_template: {message}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._variables = {k: _token_text(v) for k, v in config.items() if k.endswith("_token")}
        self.sha256 = hashlib.sha256(source.encode()).hexdigest()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._variables
            )
        except BadSample:
            raise
        except (
            Exception
        ) as err:  # whatever the template raises on this conversation is this line's error
            raise BadSample(
                "template_error", f"chat_template failed ({type(err).__name__}: {err})"
            ) from None

    def __call__(self, sample: Sample | list[Turn], tokenizer) -> list[Segment]:
        sample = as_sample(sample)
        if sample.form == "text":
            return document(sample, tokenizer)
        turns = sample.turns
        messages = [{"role": role, "content": content} for role, content in turns]
        full = self.render(messages, add_generation_prompt=False)
        segments: list[Segment] = []
        done = 0
        for index, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            answered = self.render(messages[: index + 1], add_generation_prompt=False)
            if not (
                answered.startswith(prompt) and full.startswith(answered) and len(prompt) >= done
            ):
                raise BadSample(
                    "template_error",
                    "chat_template does not render conversations incrementally, "
                    "so answer spans cannot be found; use --template mftcoder|chatml|llama2",
                )
            segments += [
                (full[done : len(prompt)], False, RENDERED),
                (full[len(prompt) : len(answered)], True, RENDERED),
            ]
            done = len(answered)
        segments.append((full[done:], False, RENDERED))
        return [s for s in segments if s[0] != ""]


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


BUILTIN_TEMPLATES: dict[str, TemplateFn] = {
    "mftcoder": mftcoder,
    "chatml": chatml,
    "llama2": llama2,
}
TEMPLATE_NAMES = (*BUILTIN_TEMPLATES, "hf")


def get_template(name: str, tokenizer) -> tuple[TemplateFn, dict]:
    """The template function and its identity for the manifest (with the Jinja an export writes)."""
    if name in BUILTIN_TEMPLATES:
        identity = {"name": name}
        jinja = builtin_chat_template(name, tokenizer)
        if jinja is not None:  # what an export writes as its chat template
            identity["chat_template"] = jinja
        return BUILTIN_TEMPLATES[name], identity
    if name == "hf":
        config = getattr(tokenizer, "config", None) or {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            raise TemplateError(
                "--template hf needs a Hugging Face tokenizer whose tokenizer_config.json "
                "has a chat_template"
            )
        template = HFChatTemplate(source, config)
        return template, {
            "name": "hf",
            "chat_template_sha256": template.sha256,
            "chat_template": source,
        }
    raise TemplateError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
