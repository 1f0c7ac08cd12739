"""Inputs for the mistakes table (tests/test_user_mistakes.py): files that are not what their name says,
a tiny real model and checkpoint, indexed data damaged on one rank only. Each function is a Mistake's
`setup`: it writes under the test's temporary folder."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

from data_fixtures import as_line, write_jsonl

TINY_MODEL = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "data.seq_length=128",
    "data.max_samples_per_task=8",
    "data.valid_samples_per_task=2",
    "train.global_batch_size=2",
    "train.micro_batch_size=1",
    "train.train_steps=1",
    "train.lr_warmup_steps=0",
    "parallel.tensor_model_parallel_size=1",
]
"""`megamft train` overrides for a run that starts in seconds."""


def conversations(tmp: Path, name: str = "data.jsonl", count: int = 12) -> Path:
    """A JSON Lines file of `count` distinct short conversations."""
    lines = [
        as_line(
            [("user", f"Add {i} and {i + 1}."), ("assistant", f"print({i} + {i + 1})")], "messages"
        )
        for i in range(count)
    ]
    return write_jsonl(tmp / name, lines)


def random_bytes(path: Path, size: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(path.name).randbytes(size))
    return path


def tokenizer_json_not_json(tmp: Path) -> None:
    conversations(tmp)
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0,\n'
    )


def tokenizer_json_binary(tmp: Path) -> None:
    """A tokenizer.json that holds random bytes, beside a folder that passes for a Hugging Face model."""
    random_bytes(tmp / "tok" / "tokenizer.json")
    fake_hf_model(tmp)


def corrupt_sentencepiece(tmp: Path) -> None:
    conversations(tmp)
    random_bytes(tmp / "tokenizer.model")


def fake_hf_model(tmp: Path) -> None:
    """A folder evaluation takes for a Hugging Face model (it has a config.json); it is never loaded."""
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "config.json").write_text("{}")


def tiny_hf_model(tmp: Path) -> Path:
    """A random 1-layer Llama in tmp/hf, as transformers saves it (one model.safetensors)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        tmp / "hf"
    )
    return tmp / "hf"


def truncated_safetensors(tmp: Path) -> None:
    """The model's safetensors file cut at half its size, as an interrupted download leaves it."""
    weights = tiny_hf_model(tmp) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def tiny_checkpoint(tmp: Path) -> None:
    """tmp/ckpt: the tiny model converted to a megamft checkpoint."""
    from megamft.checkpoint.hf_convert import hf_to_megatron

    hf_to_megatron(tiny_hf_model(tmp), tmp / "ckpt")


def data_damaged_on_rank_1(tmp: Path) -> None:
    """Indexed data in tmp/data, and in tmp/data-rank1 a copy whose first .bin is cut short; tmp/rank.sh
    trains rank 1 on the damaged copy and rank 0 on the whole one, as nodes with local copies would."""
    from megamft.data.preprocess import PreprocessOptions, preprocess

    tasks = {name: [str(conversations(tmp, f"{name}.jsonl"))] for name in ("add", "sum")}
    preprocess(PreprocessOptions(tasks=tasks, out_dir=str(tmp / "data"), progress=False))
    shutil.copytree(tmp / "data", tmp / "data-rank1")
    damaged = sorted((tmp / "data-rank1").glob("*.bin"))[0]
    os.truncate(damaged, damaged.stat().st_size // 2)
    (tmp / "rank.sh").write_text(
        "# torchrun runs this on every rank; rank 1 reads its own copy of the data\n"
        f'if [ "$RANK" = 1 ]; then data={tmp}/data-rank1; else data={tmp}/data; fi\n'
        f'exec {sys.executable} -m megamft train "$@" data.source=indexed "data.path=$data"\n'
    )
