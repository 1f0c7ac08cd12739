"""Inputs for the data tests: conversation files and small trained tokenizers of both kinds."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATIONS = [
    [
        ("system", "You write Python."),
        ("user", "Add two numbers."),
        ("assistant", "def add(a, b):\n    return a + b"),
    ],
    [
        ("user", "Reverse a list."),
        ("assistant", "xs[::-1]"),
        ("user", "In place?"),
        ("assistant", "xs.reverse()"),
    ],
    [("user", "Say hi."), ("assistant", "hi")],
]
MFTCODER_ROLES = {"system": "system", "user": "human", "assistant": "bot"}


def as_line(turns, schema: str) -> str:
    if schema == "chat_rounds":
        rounds = [{"role": MFTCODER_ROLES[r], "content": c} for r, c in turns]
        return json.dumps({"chat_rounds": rounds})
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def write_jsonl(path: Path, lines: list[str], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def write_raw(path: Path, lines: list) -> Path:
    """Lines as given (str or raw bytes, e.g. invalid UTF-8), one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    )
    return path


def run_preprocess(tmp_path: Path, lines_per_task: dict, **options) -> tuple[Path, dict]:
    """megamft-preprocess of tmp_path/in/TASK.jsonl (one file a task) into tmp_path/out: (out, manifest)."""
    from megamft.data.preprocess import PreprocessOptions, preprocess

    tasks = {
        name: [str(write_jsonl(tmp_path / "in" / f"{name}.jsonl", lines))]
        for name, lines in lines_per_task.items()
    }
    out = tmp_path / "out"
    manifest = preprocess(
        PreprocessOptions(tasks=tasks, out_dir=str(out), progress=False, **options)
    )
    return out, manifest


def training_text() -> list[str]:
    """Code-ish text for training the test tokenizers."""
    from megamft.data.stdlib_corpus import build_corpus

    corpus = build_corpus(2000, 300, seed=1)
    return [t["content"] for samples in corpus.values() for turns in samples for t in turns]


def make_sentencepiece(folder: Path) -> Path:
    from megamft.data.train_tokenizer import train_sentencepiece

    lines = [
        as_line([("user", t[:200] or "x"), ("assistant", t)], "messages") for t in training_text()
    ]
    corpus = write_jsonl(folder / "sp_corpus.jsonl", lines)
    return train_sentencepiece([corpus], folder / "sp.model", vocab_size=600)


def make_hf_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json with ChatML specials and a tokenizer_config.json chat_template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def with_special_token_at(
    source: Path, folder: Path, token: str = "<|big|>", token_id: int = 70000
) -> Path:
    """A copy of a tokenizer.json folder with one more special token at an id far past its vocab size,
    made its end-of-sequence token (so every answer ends with it), as tokenizer files can do."""
    data = json.loads((source.parent / "tokenizer.json").read_text())
    data["model"]["vocab"][token] = token_id
    data["added_tokens"].append(
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    config = json.loads((source.parent / "tokenizer_config.json").read_text()) | {
        "eos_token": token
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"
