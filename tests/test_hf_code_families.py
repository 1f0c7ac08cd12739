"""Phi-3, Gemma, Gemma 2, StarCoder (GPTBigCode) and YaRN RoPE: conversion proven against transformers.

As in test_hf_families: tiny random models are built with transformers' own
config classes (awkward shapes: head widths that are not hidden / heads, GQA
and MQA, windows shorter than the test sequence), converted with
megamft-convert and run by megamft at TP=1, TP=2 and PP=2; the logits must
equal transformers'. All cases share one launch per layout.
"""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import family_jobs  # noqa: E402
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

VOCAB, SEQ, WINDOW = 320, 24, 8  # windows shorter than the sequence, so they must be honoured
SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
BIGCODE = dict(
    n_embd=64,
    n_layer=2,
    n_head=4,
    vocab_size=VOCAB,
    n_positions=256,
    bos_token_id=1,
    eos_token_id=2,
)

CASES = {
    # microsoft/Phi-3-mini-4k-instruct's keys: fused qkv_proj and gate_up_proj, sliding_window (2047 there)
    "phi3": (
        transformers.Phi3Config,
        dict(
            SIZES,
            sliding_window=WINDOW,
            tie_word_embeddings=False,
            original_max_position_embeddings=256,
        ),
    ),
    # google/gemma-7b's shape in small: head_dim (24) x heads != hidden, tied, (1 + w) norms, scaled embeddings;
    # hidden_act "gelu" as its first config.json said (GemmaConfig reads it as the tanh approximation)
    "gemma": (transformers.GemmaConfig, dict(SIZES, head_dim=24, hidden_act="gelu")),
    # google/gemma-2-9b's keys: soft-capping, query_pre_attn_scalar, alternating windows, norms after sublayers;
    # hidden_activation "gelu" (exact GELU in Gemma2Config; published ones say gelu_pytorch_tanh)
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            SIZES,
            head_dim=24,
            sliding_window=WINDOW,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            hidden_activation="gelu",
        ),
    ),
    # bigcode/starcoder's keys: multi_query, exact GELU, learned positions, n_inner unset (4 x n_embd)
    "starcoder": (
        transformers.GPTBigCodeConfig,
        dict(BIGCODE, multi_query=True, activation_function="gelu"),
    ),
    # one key/value head per query head: c_attn interleaved per head
    "starcoder-mha": (
        transformers.GPTBigCodeConfig,
        dict(BIGCODE, n_inner=96, multi_query=False, activation_function="gelu_pytorch_tanh"),
    ),
    # Qwen/Qwen2.5-7B-Instruct's long-context rope_scaling (original 32768 there), positions past the original
    "qwen2-yarn": (
        transformers.Qwen2Config,
        dict(
            SIZES,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        ),
    ),
    # every yarn key transformers reads, with values unlike megatron-core's defaults
    "llama-yarn": (
        transformers.LlamaConfig,
        dict(
            SIZES,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 12,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "mscale": 0.9,
                "mscale_all_dim": 0.6,
                "truncate": False,
                "rope_theta": 5000.0,
            },
        ),
    ),
}
LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tensor_model_parallel_size=2",)),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
}


def _save(name: str, folder: Path) -> Path:
    config_class, keys = CASES[name]
    tiny_model(config_class(**keys)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (hf folder, megamft folder)."""
    return convert_each(tmp_path_factory, CASES, _save)


def _checkpoints(converted) -> list[tuple[str, str]]:
    return [(str(m), str(m / "megamft_model.yaml")) for _, m in converted.values()]


def _tokens() -> list[torch.Tensor]:
    return [random_tokens(VOCAB, SEQ) for _ in CASES]


def _assert_logits_equal(converted, ours, tokens):
    for (name, (hf_dir, _)), mine, case_tokens in zip(converted.items(), ours, tokens):
        torch.testing.assert_close(
            mine[..., :VOCAB], hf_logits(hf_dir, case_tokens), rtol=0, atol=1e-4, msg=name
        )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(converted, layout):
    world_size, overrides = LAYOUTS[layout]
    tokens = _tokens()
    results = launch(
        jobs.converted_logits_of_each,
        world_size,
        timeout=300,
        kwargs=dict(checkpoints=_checkpoints(converted), overrides=overrides, tokens=tokens),
    )
    _assert_logits_equal(converted, next(r for r in results if r is not None), tokens)


def test_converted_model_sections(converted):
    """What the family rows promise, read from the converted model sections."""
    models = {
        name: hf_convert.plan_hf_to_megatron(hf_dir)[0] for name, (hf_dir, _) in converted.items()
    }
    gemma, gemma2, star = models["gemma"], models["gemma2"], models["starcoder"]
    assert (
        gemma.mlp_activation,
        gemma.zero_centered_norm_weight,
        gemma.scale_embeddings,
        gemma.kv_channels,
        gemma.tie_embeddings,
    ) == ("geglu_tanh", True, True, 24, True)
    assert (
        gemma2.mlp_activation,
        gemma2.post_sublayer_norms,
        gemma2.attention_logit_softcap,
        gemma2.final_logit_softcap,
        gemma2.attention_scale_dim,
        gemma2.sliding_window,
        gemma2.sliding_window_layers,
    ) == ("geglu", True, 2.0, 3.0, 20, WINDOW, [True, False])
    assert (
        star.position_embedding,
        star.num_query_groups,
        star.ffn_hidden_size,
        star.mlp_activation,
        star.normalization,
        star.add_bias_linear,
    ) == ("learned_absolute", 1, 256, "gelu", "LayerNorm", True)
    assert models["starcoder-mha"].num_query_groups == 4
    llama = models["llama-yarn"]
    assert (
        llama.rope_scaling_type,
        llama.rope_scaling_factor,
        llama.rope_yarn_original_max_position_embeddings,
        llama.rope_yarn_beta_fast,
        llama.rope_yarn_beta_slow,
        llama.rope_yarn_mscale,
        llama.rope_yarn_mscale_all_dim,
        llama.rope_yarn_truncate,
    ) == ("yarn", 8.0, 12, 16.0, 2.0, 0.9, 0.6, False)


def test_round_trip_through_tp2_pp2_is_bit_identical(converted, tmp_path):
    """Resaved from TP=2 x PP=2 with sequence parallel (whose logits must also equal transformers': StarCoder's
    one key/value head replicated over two TP ranks, Gemma 2's post-sublayer norms on sequence shards)."""
    out_dirs = [str(tmp_path / name) for name in CASES]
    tokens = _tokens()
    results = launch(
        jobs.resave_each,
        4,
        timeout=300,
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
    _assert_logits_equal(converted, next(r for r in results if r is not None), tokens)
    for (name, (hf_dir, _)), resaved in zip(converted.items(), out_dirs):
        assert_exports_bit_identical(resaved, tmp_path / f"{name}_hf", hf_dir, name)


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_without_key_warnings(converted, name, tmp_path):
    hf_dir, megatron_dir = converted[name]
    assert_export_loads_in_transformers(
        hf_dir, megatron_dir, tmp_path / "export", random_tokens(VOCAB, SEQ)
    )


def test_parameter_count_of_the_estimator_equals_transformers(converted):
    """The memory estimator's count (post-sublayer norms, learned positions, MQA, biases) against the model."""
    for name, (hf_dir, _) in converted.items():
        ours, theirs = parameter_counts(hf_dir)
        assert ours == theirs, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi3", "gemma2", "starcoder", "llama-yarn"])
def test_fine_tuning_lowers_the_loss(converted, name):
    """A few training steps of a converted model at TP=2 lower its loss (Gemma 2: soft-caps, post-sublayer norms and
    GELU gates in the backward pass; StarCoder: learned positions restarted per packed document, one key/value head
    over two TP ranks; YaRN's scaled frequencies)."""
    _, megatron_dir = converted[name]
    overrides = (
        "parallel.tensor_model_parallel_size=2",
        "train.train_steps=4",
        "train.lr_warmup_steps=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=2",
        "optimizer.lr=0.01",
        f"checkpoint.load_dir={megatron_dir}",
        "checkpoint.load_optimizer=false",
    )
    loss = launch(
        jobs.train,
        2,
        timeout=300,
        kwargs=dict(overrides=overrides, config_files=(str(megatron_dir / "megamft_model.yaml"),)),
    )[0]["loss"]
    assert loss[-1] < loss[0], loss


# Published rope_scaling of Qwen/Qwen2.5-7B-Instruct (head 128, theta 1e6) and deepseek-ai/DeepSeek-V2-Lite's (on
# its 64-wide rotary part), and every yarn key with values unlike megatron-core's defaults.
YARN = {
    "qwen2.5": (
        128,
        1e6,
        131072,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    ),
    "deepseek-v2-lite": (
        64,
        10000.0,
        163840,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
    "explicit": (
        96,
        500000.0,
        65536,
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.3,
            "truncate": False,
        },
    ),
    "mscale-alone": (
        64,
        10000.0,
        32768,
        {  # transformers ignores mscale without mscale_all_dim
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 2048,
            "mscale": 0.5,
        },
    ),
}
POSITIONS = [0, 1, 777, 2047, 2048, 4095, 4096, 8191, 8192, 32767, 32768, 65535, 131071]


def test_yarn_rotary_tables_equal_transformers_at_long_positions():
    """cos and sin (with the attention factor) of megamft's GPTModel against transformers' rotary embedding."""
    from megamft.model.families import model_config_from_hf

    models, theirs = [], []
    for head, theta, context, rope in YARN.values():
        keys = dict(
            hidden_size=4 * head,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            num_hidden_layers=1,
            vocab_size=128,
            max_position_embeddings=context,
        )
        hf = transformers.LlamaConfig(**keys, rope_parameters={**rope, "rope_theta": theta})
        model = model_config_from_hf(
            {
                "architectures": ["LlamaForCausalLM"],
                **keys,
                "rope_theta": theta,
                "rope_scaling": rope,
            }
        )
        models.append({k: v for k, v in model.__dict__.items()})
        positions = torch.tensor([[p for p in POSITIONS if p < context]])
        cos, sin = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)(
            torch.zeros(1), positions
        )
        theirs.append((cos[0], sin[0]))
    ours = launch(
        family_jobs.rotary_tables, 1, timeout=240, kwargs=dict(models=models, positions=POSITIONS)
    )[0]
    for name, (cos, sin), (their_cos, their_sin) in zip(YARN, ours, theirs):
        n = len(their_cos)
        torch.testing.assert_close(cos[:n], their_cos, rtol=0, atol=2e-6, msg=name)
        torch.testing.assert_close(sin[:n], their_sin, rtol=0, atol=2e-6, msg=name)
