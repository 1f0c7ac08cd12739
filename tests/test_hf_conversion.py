"""Hugging Face <-> megatron conversion, proven against transformers itself.

Tiny random models of each family are built here with transformers, converted
with megamft-convert, and run by megamft at TP=1, TP=2 and PP=2: the logits must
equal transformers' logits. Exports must load in transformers with no missing
or unexpected keys, and a round trip must give back the very same tensors.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import jobs  # noqa: E402
from hf_models import (  # noqa: E402
    convert_each,
    hf_logits,
    megamft_logits,
    random_tokens,
    resave,
    sharded_tensors,
    tiny_model,
)

from megamft.checkpoint import hf_convert  # noqa: E402
from megamft.testing.distributed import launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

CASES = {
    "llama": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, rope_theta=1e6),
    ),  # CodeLlama's theta
    "llama-gqa-padded-vocab": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, vocab_size=300),
    ),
    "llama-rope-linear": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        ),
    ),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2-bias-tied": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
}
LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tensor_model_parallel_size=2",)),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
}


def _save_tiny_hf_model(name: str, folder: Path) -> Path:
    config_class, extra = CASES[name]
    model = tiny_model(config_class(**{**BASE, **extra}))
    # Mistral is saved in several shards with an index; the others as one file.
    model.save_pretrained(folder, max_shard_size="60KB" if name == "mistral" else "1GB")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 256, "case": name})
    )
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (hf folder, megamft folder); converted once per module."""
    return convert_each(tmp_path_factory, CASES, _save_tiny_hf_model)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CASES))
def test_megamft_logits_match_transformers(converted, name, layout):
    hf_dir, megatron_dir = converted[name]
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    tokens = random_tokens(vocab)
    world_size, overrides = LAYOUTS[layout]
    ours = megamft_logits(megatron_dir, tokens, world_size, overrides)
    theirs = hf_logits(hf_dir, tokens)
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=0, atol=1e-4)


def test_sharded_source_is_read_through_its_index(converted):
    hf_dir, _ = converted["mistral"]  # its logits test passes only if every shard was read
    source = hf_convert.SafetensorsFolder(hf_dir)
    assert len(set(source.weight_map.values())) > 1


def test_unsupported_bias_and_sliding_window_are_handled(converted, tmp_path):
    from megamft.config import validate
    from megamft.model.families import UnsupportedModel, model_config_from_hf

    hf_dir, _ = converted["llama"]
    config = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(UnsupportedModel, match="attention_bias"):
        model_config_from_hf({**config, "attention_bias": True})
    mistral = {**config, "architectures": ["MistralForCausalLM"], "sliding_window": 128}
    model = model_config_from_hf(mistral)
    assert model.sliding_window == 128
    from megamft.config import MegamftConfig
    from megamft.model.attention_window import window_size

    cfg = MegamftConfig(model=model)
    validate(
        cfg, 1
    )  # sequences longer than the window: the window is applied (test_hf_families proves it)
    assert window_size(cfg) == (127, 0)


def test_round_trip_through_tp2_pp2_is_bit_identical(converted, tmp_path):
    hf_dir, megatron_dir = converted["qwen2-bias-tied"]
    resaved = tmp_path / "tp2pp2"
    resave(
        megatron_dir,
        ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"),
        resaved,
    )
    exported = hf_convert.megatron_to_hf(
        resaved, tmp_path / "hf_out", hf_template=hf_dir, max_shard_bytes=40_000
    )
    original = load_file(hf_dir / "model.safetensors")
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the small shard limit forced several shards
    back = sharded_tensors(exported)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("name", ["llama-gqa-padded-vocab", "llama-rope-linear", "qwen2-bias-tied"])
def test_export_loads_in_transformers_without_key_warnings(converted, name, tmp_path):
    hf_dir, megatron_dir = converted[name]
    exported = hf_convert.megatron_to_hf(megatron_dir, tmp_path / "export", hf_template=hf_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True
    )
    assert not any(info.values()), info
    assert json.loads((exported / "tokenizer_config.json").read_text())["case"] == name
    vocab = model.config.vocab_size
    tokens = random_tokens(vocab)
    torch.testing.assert_close(
        hf_logits(exported, tokens), hf_logits(hf_dir, tokens), rtol=0, atol=0
    )


def test_fine_tuned_model_exports_and_runs_in_transformers(converted, tmp_path):
    hf_dir, megatron_dir = converted["llama"]
    run_dir = tmp_path / "run"
    overrides = (
        "parallel.tensor_model_parallel_size=2",
        "train.train_steps=3",
        "train.lr_warmup_steps=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=2",
        "model.max_position_embeddings=256",
        f"checkpoint.load_dir={megatron_dir}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={run_dir}",
    )
    result = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs=dict(overrides=overrides, config_files=(str(megatron_dir / "megamft_model.yaml"),)),
    )[0]
    assert result["loss"][-1] < result["loss"][0]
    exported = hf_convert.megatron_to_hf(run_dir, tmp_path / "export", hf_template=hf_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True
    )
    assert not any(info.values()), info
    tokens = random_tokens(model.config.vocab_size)
    with torch.no_grad():
        tuned = model(tokens).logits
    assert torch.isfinite(tuned).all()
    assert not torch.allclose(tuned, hf_logits(hf_dir, tokens))  # training changed the weights


def _convert_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_dry_run_prints_the_plan_and_writes_nothing(converted, tmp_path):
    hf_dir, _ = converted["qwen2-bias-tied"]
    proc = _convert_cli(
        "hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "x"), "--dry-run"
    )
    assert proc.returncode == 0, proc.stderr
    assert "decoder.layers.self_attention.linear_qkv.bias" in proc.stdout
    assert "output_layer.weight" not in proc.stdout  # tied embeddings
    assert not (tmp_path / "x").exists()


def test_cli_errors_are_clear(converted, tmp_path):
    hf_dir, _ = converted["llama-gqa-padded-vocab"]
    proc = _convert_cli(
        "hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "y"), "--target-tp", "3"
    )
    assert proc.returncode == 2
    assert (
        "attention heads (4) is not divisible by TP (3)" in proc.stderr
        and "Traceback" not in proc.stderr
    )

    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    proc = _convert_cli("hf-to-megatron", "--hf", str(bad), "--out", str(tmp_path / "z"))
    assert proc.returncode == 2 and "architecture 'GPT2LMHeadModel' is not supported" in proc.stderr


def test_missing_or_misshapen_tensors_are_named(converted, tmp_path):
    hf_dir, _ = converted["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    with pytest.raises(
        hf_convert.ConversionError,
        match=r"model.layers.0.mlp.gate_proj.weight has shape \(128, 64\)",
    ):
        hf_convert.hf_to_megatron(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_warm_start_first_step_loss_equals_transformers(converted):
    """The first training step's loss of a converted model is the HF model's loss on that batch."""
    from megamft.data.dataset import load_data

    hf_dir, megatron_dir = converted["llama"]
    overrides = (
        "train.train_steps=2",
        "train.lr_warmup_steps=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=2",
        "data.mode=pad",
        "loss.mode=token",
        f"checkpoint.load_dir={megatron_dir}",
        "checkpoint.load_optimizer=false",
    )
    ours = launch(
        jobs.train,
        1,
        timeout=240,
        kwargs=dict(overrides=overrides, config_files=(str(megatron_dir / "megamft_model.yaml"),)),
    )[0]["loss"][0]

    cfg = jobs.tiny_config(*overrides, config_files=(str(megatron_dir / "megamft_model.yaml"),))
    data = load_data(cfg.data)
    batch = data.batches(data.train_rows(0, 4, 0, 1), 4)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(batch["tokens"]).logits
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    )
    theirs = float((per_token * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum())
    assert abs(ours - theirs) <= 1e-5 * theirs, (ours, theirs)


def test_lora_fine_tune_exports_merged_and_matches_in_transformers(converted, tmp_path):
    hf_dir, megatron_dir = converted["qwen2-bias-tied"]
    run_dir = tmp_path / "lora_run"
    lora = (
        "lora.enabled=true",
        "lora.rank=4",
        "lora.alpha=8",
        "parallel.tensor_model_parallel_size=2",
    )
    overrides = lora + (
        "train.train_steps=3",
        "train.lr_warmup_steps=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=2",
        "optimizer.lr=0.01",
        f"checkpoint.load_dir={megatron_dir}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={run_dir}",
    )
    model_yaml = str(megatron_dir / "megamft_model.yaml")
    launch(jobs.train, 2, timeout=240, kwargs=dict(overrides=overrides, config_files=(model_yaml,)))
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    tokens = random_tokens(vocab)
    ours = megamft_logits(run_dir, tokens, 2, lora, model_yaml=model_yaml)
    exported = hf_convert.megatron_to_hf(run_dir, tmp_path / "export", hf_template=hf_dir)
    theirs = hf_logits(exported, tokens)
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=0, atol=1e-4)
    assert not torch.allclose(
        theirs, hf_logits(hf_dir, tokens), atol=1e-4
    )  # the adapters changed it
