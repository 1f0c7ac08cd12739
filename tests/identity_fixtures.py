"""Damaged inputs for the content-identity rows of tests/test_user_mistakes.py."""

import json
import shutil


def converted_with_template(tmp, spoil) -> None:
    """tmp/hf: a tiny Llama with a tokenizer; tmp/ckpt: its conversion; tmp/other: a copy of tmp/hf, spoilt."""
    import torch
    from data_fixtures import make_hf_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from megamft.checkpoint.hf_convert import hf_to_megatron
    from megamft.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(make_hf_tokenizer(tmp / "hf"))).max_token_id + 1
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(str(tmp / "hf"))
    hf_to_megatron(tmp / "hf", tmp / "ckpt")
    shutil.copytree(tmp / "hf", tmp / "other")
    spoil(tmp / "other")


def other_size(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "hidden_size": 64, "intermediate_size": 128})
    )


def tokenizer_past_the_vocabulary(folder) -> None:
    from data_fixtures import with_special_token_at

    with_special_token_at(folder / "tokenizer.json", folder, token_id=70000)


EXPORT = [
    "megamft-convert",
    "megatron-to-hf",
    "--checkpoint",
    "{tmp}/ckpt",
    "--out",
    "{tmp}/export",
    "--hf-template",
    "{tmp}/other",
]


def training_refusal(overrides: tuple[str, ...]) -> str | None:
    """(Run on every rank by megamft.testing.launch.) Train; the DataIntegrityError this rank stopped with, if any."""
    import os

    from megamft.config import load_config, validate
    from megamft.data.manifest import DataIntegrityError
    from megamft.training.loop import run

    cfg = load_config([], list(overrides))
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    try:
        run(cfg)
    except DataIntegrityError as err:
        return str(err)
    return None
