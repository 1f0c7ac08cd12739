"""StarCoder2, Llama 3.x (llama3 RoPE) and Qwen3: conversion proven against transformers.

As in test_hf_conversion: tiny random models are built with transformers' own
config classes, converted with megamft-convert and run by megamft at TP=1, TP=2
and PP=2; the logits must equal transformers'. The three families share one
launch per layout to keep the number of multi-process starts low.
"""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import jobs  # noqa: E402
from hf_models import (  # noqa: E402
    assert_export_loads_in_transformers,
    assert_exports_bit_identical,
    convert_each,
    hf_logits,
    parameter_counts,
    random_tokens,
    tiny_model,
)

from megamft.checkpoint import hf_convert  # noqa: E402
from megamft.testing.distributed import launch  # noqa: E402

SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
)
WINDOW, SEQ = 8, 24  # StarCoder2's window is shorter than the test sequence, so it must be honoured

CASES = {
    # Keys of bigcode/starcoder2-3b's config.json: use_bias, norm_epsilon, gelu_pytorch_tanh,
    # sliding_window (4096 there), rope_theta 999999.44, tied embeddings.
    "starcoder2": (
        transformers.Starcoder2Config,
        dict(
            use_bias=True,
            norm_epsilon=1e-5,
            hidden_act="gelu_pytorch_tanh",
            sliding_window=WINDOW,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 999999.4420358813},
        ),
    ),
    # Keys of meta-llama/Llama-3.2-1B's rope_scaling (llama3, factor 32, low 1, high 4, original 8192);
    # the values here differ from all three that megatron-core hard-codes, so using those would show.
    "llama3": (
        transformers.LlamaConfig,
        dict(
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 8.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
        ),
    ),
    # Keys of Qwen/Qwen3-0.6B's config.json: head_dim 128 with hidden 1024 and 16 heads (heads x head_dim
    # != hidden), per-head q_norm/k_norm, rms_norm_eps 1e-6, tied embeddings, use_sliding_window false.
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            head_dim=32,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}
LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tensor_model_parallel_size=2",)),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
}


def _save_tiny_hf_model(name: str, folder: Path) -> Path:
    config_class, extra = CASES[name]
    tiny_model(config_class(**{**SIZES, **extra})).save_pretrained(folder)
    return folder


def _tokens(vocab: int) -> torch.Tensor:
    return random_tokens(vocab, SEQ)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (hf folder, megamft folder)."""
    return convert_each(tmp_path_factory, CASES, _save_tiny_hf_model)


def _checkpoints(converted) -> list[tuple[str, str]]:
    return [(str(m), str(m / "megamft_model.yaml")) for _, m in converted.values()]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_family_logits_match_transformers(converted, layout):
    world_size, overrides = LAYOUTS[layout]
    tokens = [_tokens(SIZES["vocab_size"]) for _ in CASES]
    results = launch(
        jobs.converted_logits_of_each,
        world_size,
        timeout=240,
        kwargs=dict(checkpoints=_checkpoints(converted), overrides=overrides, tokens=tokens),
    )
    ours = next(r for r in results if r is not None)
    for (name, (hf_dir, _)), mine, case_tokens in zip(converted.items(), ours, tokens):
        theirs = hf_logits(hf_dir, case_tokens)
        torch.testing.assert_close(
            mine[..., : SIZES["vocab_size"]], theirs, rtol=0, atol=1e-4, msg=name
        )


def test_converted_model_sections(converted):
    """What the families table promises, read from the converted model sections."""
    models = {
        name: hf_convert.plan_hf_to_megatron(hf_dir)[0] for name, (hf_dir, _) in converted.items()
    }
    star, llama3, qwen3 = models["starcoder2"], models["llama3"], models["qwen3"]
    assert (star.normalization, star.mlp_activation, star.add_bias_linear, star.sliding_window) == (
        "LayerNorm",
        "gelu_tanh",
        True,
        WINDOW,
    )
    assert (
        llama3.rope_scaling_type,
        llama3.rope_scaling_factor,
        llama3.rope_llama3_low_freq_factor,
        llama3.rope_llama3_high_freq_factor,
        llama3.rope_llama3_original_max_position_embeddings,
    ) == ("llama3", 8.0, 2.0, 8.0, 64)
    assert (qwen3.kv_channels, qwen3.qk_layernorm, qwen3.sliding_window) == (32, True, None)


def test_round_trip_through_tp2_pp2_is_bit_identical(converted, tmp_path):
    """Resaved from TP=2 x PP=2 with sequence parallel, whose logits (megamft's LayerNorm and q/k norms
    under sequence parallel) must also equal transformers'."""
    out_dirs = [str(tmp_path / name) for name in CASES]
    tokens = [_tokens(SIZES["vocab_size"]) for _ in CASES]
    results = launch(
        jobs.resave_each,
        4,
        timeout=240,
        kwargs=dict(
            checkpoints=_checkpoints(converted),
            out_dirs=out_dirs,
            tokens=tokens,
            overrides=(
                "parallel.tensor_model_parallel_size=2",
                "parallel.pipeline_model_parallel_size=2",
                "parallel.sequence_parallel=true",
            ),
        ),
    )
    ours = next(r for r in results if r is not None)
    for (name, (hf_dir, _)), resaved, mine, case_tokens in zip(
        converted.items(), out_dirs, ours, tokens
    ):
        theirs = hf_logits(hf_dir, case_tokens)
        torch.testing.assert_close(
            mine[..., : SIZES["vocab_size"]], theirs, rtol=0, atol=1e-4, msg=name
        )
        assert_exports_bit_identical(resaved, tmp_path / f"{name}_hf", hf_dir, name)


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_without_key_warnings(converted, name, tmp_path):
    hf_dir, megatron_dir = converted[name]
    assert_export_loads_in_transformers(
        hf_dir, megatron_dir, tmp_path / "export", _tokens(SIZES["vocab_size"])
    )


def test_parameter_count_of_the_estimator_equals_transformers(converted):
    """The memory estimator's parameter count (biases, LayerNorm, q/k norms, wide heads) against the model."""
    for name, (hf_dir, _) in converted.items():
        ours, theirs = parameter_counts(hf_dir)
        assert ours == theirs, name
