"""The tokenizer files of a Hugging Face folder: copied through conversions, given the training chat template.

An export must format prompts as training did. transformers reads a
`chat_template.jinja` beside the tokenizer first (transformers >= 4.43 writes
one) and `tokenizer_config.json`'s "chat_template" otherwise; inference servers
read either. So the template training used is written to both, replacing the
base model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    CHAT_TEMPLATE_FILE,
)
_CONFIG = "tokenizer_config.json"


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst`; their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_chat_template(folder: Path, source: str) -> None:
    """Make `source` the chat template of the tokenizer in `folder` (a folder being written, not yet published)."""
    (folder / CHAT_TEMPLATE_FILE).write_text(source, encoding="utf-8")
    config_path = folder / _CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = (
            source  # also replaces a list of named templates: training used this one
        )
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def training_chat_template(common: dict) -> str | None:
    """The chat template a checkpoint's training data was rendered with, if it recorded one."""
    template = common.get("data_template") or {}
    return template.get("chat_template")
