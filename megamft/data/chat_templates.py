"""Jinja chat templates that render what megamft's built-in templates train on.

An export writes the one its training data used, so transformers'
`apply_chat_template(messages, add_generation_prompt=True)` and inference
servers build the prompt the model was trained with. Each is generated for a
tokenizer: the BOS in front (chatml, llama2) and the EOS after an answer are
written as that tokenizer's own token strings, the ids training used.

Rendered strings equal the concatenated segments of templates.py. Token ids
also agree where the tokenizer gives the same ids for the whole string as for
its segments encoded one by one (see README, "Chat templates of exports").
"""

from __future__ import annotations

import json
import re

# An optional leading system message, then turns that must alternate question/answer: opens the loop over
# `turns` that _MFTCODER and _LLAMA2 close.
_SYSTEM_AND_ALTERNATING_TURNS = """\
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}
{%- for message in turns -%}
{%- set asks = message['role'] in ['user', 'human'] -%}
{%- if asks != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
"""

# MFTCoder's published template (mftcoder_accelerate/src/tokenizer/chat_template.py), same strings,
# plus the no-break-space cleaning its preprocessing applies to every content.
_MFTCODER = (
    _SYSTEM_AND_ALTERNATING_TURNS
    + """\
{%- set content = message['content'] | replace('\\u00a0', ' ') | replace('\\u202f', ' ') -%}
{%- if loop.first and system is not none -%}
{{ '<s>system\\n' + (system | replace('\\u00a0', ' ') | replace('\\u202f', ' ')) + '\\n' }}
{%- endif -%}
{%- if asks -%}{{ '<s>human\\n' + content + '\\n' }}
{%- elif message['role'] in ['assistant', 'bot', 'gpt'] -%}{{ '<s>bot\\n' + content + '\\n' + EOS + '\\n' }}
{%- else -%}{{ raise_exception('Only user/human and assistant/bot roles are supported!') }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<s>bot\\n' }}{%- endif -%}
"""
)

_CHATML = """\
{{ PREFIX }}
{%- set roles = {'human': 'user', 'bot': 'assistant', 'gpt': 'assistant'} -%}
{%- for message in messages -%}
{{ '<|im_start|>' + roles.get(message['role'], message['role']) + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""

# A conversation ending with a question renders "[INST] q [/INST]": the generation prompt adds nothing.
_LLAMA2 = (
    _SYSTEM_AND_ALTERNATING_TURNS
    + """\
{%- if asks -%}{{ PREFIX + '[INST] ' }}
{%- if loop.first and system is not none -%}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif -%}
{{ message['content'] + ' [/INST]' }}
{%- else -%}{{ message['content'] + EOS }}{%- endif -%}
{%- endfor -%}
"""
)

_SOURCES = {"mftcoder": _MFTCODER, "chatml": _CHATML, "llama2": _LLAMA2}


def builtin_chat_template(name: str, tokenizer) -> str | None:
    """The Jinja source for built-in template `name` with this tokenizer's BOS/EOS strings.

    None when a token it needs has no string the tokenizer would read back as that token.
    """
    eos = token_string(tokenizer, tokenizer.eos_id)
    prefix = [token_string(tokenizer, i) for i in tokenizer.prefix_ids]
    if eos is None or None in prefix:
        return None
    values = {"PREFIX": _literal("".join(prefix)), "EOS": _literal(eos)}
    return re.sub(r"\b(PREFIX|EOS)\b", lambda m: values[m.group(1)], _SOURCES[name])  # one pass


def token_string(tokenizer, token_id: int) -> str | None:
    """The special-token string that the tokenizer turns into `token_id`."""
    return next((text for text, i in tokenizer.specials.items() if i == token_id), None)


def _literal(text: str) -> str:
    """A Jinja string literal (Jinja reads JSON's escapes as Python's)."""
    return json.dumps(text, ensure_ascii=False)
