"""What a megatron-to-hf export records of its source, and refuses of its template.

`source_identity` goes into the export as megamft_source.json: the checkpoint it was made from
(folder, iteration, and a digest of the iteration as saved: its metadata, common state, config
and the names and sizes of its files, so that a copy of the checkpoint has the same digest),
the LoRA base under adapter-only weights, and the template's files.

`check_template` refuses a template (--hf-template, or the hf/ folder a conversion left beside
the checkpoint) that does not fit the model: its config.json describes another architecture or
other sizes (the export would merge its other keys into this model's config), or its tokenizer
does not fit: ids past the model's vocabulary, another tokenizer file than the one the training
data was tokenized with (when the checkpoint recorded it), special tokens its own
tokenizer_config.json names but its tokenizer lacks, or, when the training tokenizer is not
known, <|...|> tokens the chat template the export writes uses but its tokenizer lacks.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from megamft.checkpoint.layout import CONFIG_FILE, DATA_IDENTITY_FILE
from megamft.errors import UserError
from megamft.platform.checksums import folder_digests

SOURCE_FILE = "megamft_source.json"
_STRUCTURE = (
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "num_experts",
    "num_local_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# <|im_start|>, <|endoftext|>: strings that are special tokens wherever a chat template uses them (unlike <s>,
# which MFTCoder's template writes as text for tokenizers that have no such token)
_SPECIAL_LOOKING = re.compile(r"<\|[^<>|\s]+\|>")
_STANDARD_FILE = {"huggingface": "tokenizer.json", "sentencepiece": "tokenizer.model"}


class TemplateMismatch(UserError, ValueError):
    """A Hugging Face template folder whose config or tokenizer does not fit the exported model."""


def checkpoint_digest(ckpt: Path) -> str:
    """A digest of one iteration folder as saved (small files whole, large ones by name and size)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        name = path.relative_to(ckpt).as_posix()
        small = name in ("metadata.json", "common.pt", CONFIG_FILE, DATA_IDENTITY_FILE)
        digest.update(f"{name}:{path.stat().st_size}:".encode())
        if small:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def source_identity(ckpt: Path, iteration: int, base: dict | None, template: Path | None) -> dict:
    """What megamft_source.json records of the export's source."""
    record = {
        "checkpoint": str(ckpt.resolve()),
        "iteration": iteration,
        "digest": checkpoint_digest(ckpt),
    }
    if base is not None:
        record["lora_base"] = dict(base)
    data = ckpt / DATA_IDENTITY_FILE
    if data.is_file():
        record["data"] = json.loads(data.read_text())
    if template is not None:
        files = [
            p
            for p in sorted(template.iterdir())
            if p.is_file() and p.suffix in (".json", ".model", ".txt", ".jinja")
        ]
        record["template"] = {"folder": str(template.resolve()), "files": folder_digests(files)}
    return record


# ---------------------------------------------------------------- template fit


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TemplateMismatch(f"{path} cannot be read as JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def config_problems(template: Path, exported: dict) -> list[str]:
    """Keys of the template's config.json that describe another model than the exported config. A null in the
    template (Mixtral's head_dim) leaves the value to transformers' own derivation: not a difference."""
    path = template / "config.json"
    if not path.is_file():
        return []
    theirs = _read_json(path)
    problems = []
    for key in _STRUCTURE:
        if theirs.get(key) is not None and key in exported:
            a, b = theirs[key], exported[key]
            if key == "architectures":
                a, b = (a or [None])[0], (b or [None])[0]
            if a != b:
                problems.append(f"config.json has {key}={a!r}, the model {b!r}")
    return problems


class _Vocabulary:
    """The tokens of a template's tokenizer.json or tokenizer.model: has(token), largest id."""

    def __init__(self, template: Path):
        self.file = None
        if (template / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.file = template / "tokenizer.json"
            tok = Tokenizer.from_file(str(self.file))
            self._ids = tok.get_vocab(with_added_tokens=True)
            self.largest = max(self._ids.values(), default=-1)
        elif (template / "tokenizer.model").is_file():
            import sentencepiece

            self.file = template / "tokenizer.model"
            sp = sentencepiece.SentencePieceProcessor(model_file=str(self.file))
            self._ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            self.largest = sp.get_piece_size() - 1

    def has(self, token: str) -> bool:
        return token in self._ids


def _token_text(value) -> str | None:
    return (
        value.get("content")
        if isinstance(value, dict)
        else value
        if isinstance(value, str)
        else None
    )


def tokenizer_problems(
    template: Path, vocab_size: int | None, chat_template: str | None, trained_with: dict | None
) -> list[str]:
    """Why the template's tokenizer cannot be the model's: [] when it fits (or the template has none)."""
    try:
        vocabulary = _Vocabulary(template)
    except Exception as err:  # noqa: BLE001 - the tokenizers/sentencepiece libraries' own errors
        return [f"its tokenizer cannot be read ({type(err).__name__}: {str(err)[:200]})"]
    if vocabulary.file is None:
        return []
    name = vocabulary.file.name
    problems = []
    if vocab_size and vocabulary.largest >= vocab_size:
        problems.append(
            f"{name} has ids up to {vocabulary.largest}, the model's vocabulary {vocab_size} rows"
        )
    config_path = template / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    named = {key: _token_text(config.get(key)) for key in _SPECIAL_KEYS}
    for key, token in named.items():
        if token and not vocabulary.has(token):
            problems.append(f"tokenizer_config.json's {key} {token!r} is not a token of {name}")
    trained = _training_tokenizer_problems(template, trained_with)
    if trained_with and "sha256" in trained_with and not trained:
        return problems  # the training tokenizer itself: the chat template tokenizes as in training
    own = config.get("chat_template") if isinstance(config.get("chat_template"), str) else ""
    if (
        template / "chat_template.jinja"
    ).is_file():  # read before tokenizer_config.json's by transformers
        own = (template / "chat_template.jinja").read_text(encoding="utf-8")
    for token in sorted(set(_SPECIAL_LOOKING.findall(chat_template or own or ""))):
        if not vocabulary.has(token):
            problems.append(f"the chat template uses {token!r}, which is not a token of {name}")
    return problems + trained


def _training_tokenizer_problems(template: Path, trained_with: dict | None) -> list[str]:
    """The tokenizer file the training data was tokenized with (the checkpoint's megamft_data.json) against the
    template's file of that kind."""
    if not trained_with or "sha256" not in trained_with:
        return []
    name = _STANDARD_FILE.get(trained_with.get("kind"), trained_with.get("file"))
    path = template / str(name)
    if not path.is_file():
        return [
            f"it has no {name}, while the training data was tokenized with a {trained_with.get('file')}"
        ]
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != trained_with["sha256"]:
        return [
            f"its {name} is not the {trained_with.get('file')} the training data was tokenized with "
            f"(sha256 {found[:12]}..., the data's {trained_with['sha256'][:12]}...)"
        ]
    return []


def check_template(
    template: Path,
    described: str,
    exported: dict,
    vocab_size: int | None,
    chat_template: str | None,
    ckpt: Path,
) -> None:
    """Raise TemplateMismatch naming every way the template does not fit the exported model."""
    data = ckpt / DATA_IDENTITY_FILE
    trained_with = json.loads(data.read_text()).get("tokenizer") if data.is_file() else None
    problems = config_problems(template, exported)
    problems += tokenizer_problems(template, vocab_size, chat_template, trained_with)
    if problems:
        raise TemplateMismatch(
            f"{described} does not fit the checkpoint's model: {'; '.join(problems)}. Give the "
            "Hugging Face folder of the model this checkpoint was trained from as --hf-template"
        )
