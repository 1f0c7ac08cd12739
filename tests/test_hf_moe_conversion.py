"""Mixture-of-experts conversion (Mixtral, Qwen2-MoE, Qwen3-MoE), proven against transformers itself.

Tiny random MoE models are built with transformers, converted, and run by
megamft at TP=1, TP=2 (with sequence parallel, as MoE training needs), PP=2,
EP=2 and TP=2 x EP=2 (experts not tensor-parallel) on two ranks: the logits
must equal transformers'. Both expert layouts on disk are read (one tensor per
expert, as transformers writes; the fused 3-D tensors it holds in memory).
Exports load in transformers with no missing or unexpected key and no warning
and hold the very tensors converted (a round trip through EP=2 x PP=2 too).
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    convert_each,
    hf_logits,
    megamft_logits,
    parameter_counts,
    random_tokens,
    resave,
    sharded_tensors,
    tiny_model,
)

from megamft.checkpoint import hf_convert  # noqa: E402
from megamft.model.families import model_config_from_hf  # noqa: E402

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
QWEN = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=8,
    num_experts_per_tok=2,
)
CASES = {
    # top-2 of 4, weights renormalized always; saved in several shards
    "mixtral": (
        transformers.MixtralConfig,
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        False,
    ),
    # fine-grained experts, gated shared expert, q/k/v biases, top-k weights NOT renormalized
    "qwen2-moe": (transformers.Qwen2MoeConfig, dict(QWEN, norm_topk_prob=False), False),
    # top-3 renormalized (norm_topk_prob), read from transformers' fused 3-D expert tensors
    "qwen2-moe-fused": (
        transformers.Qwen2MoeConfig,
        dict(QWEN, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True),
        True,
    ),
    # Qwen3-Coder's shape in small: per-head q/k norms, head_dim (24) != hidden / heads, no q/k/v bias,
    # no shared expert, top-3 of 8 renormalized (norm_topk_prob, as Qwen3-Coder-30B-A3B sets it)
    "qwen3-moe": (
        transformers.Qwen3MoeConfig,
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            head_dim=24,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
        False,
    ),
}
LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
    "ep2": (2, ("parallel.expert_model_parallel_size=2",)),
    # attention split over 2 TP ranks, experts over the same 2 ranks as EP (one launch for both)
    "tp2ep2": (
        2,
        (
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
            "parallel.expert_model_parallel_size=2",
            "parallel.expert_tensor_parallel_size=1",
        ),
    ),
}
RUNS = [("mixtral", layout) for layout in LAYOUTS] + [
    ("qwen2-moe", "tp1"),
    ("qwen2-moe", "ep2"),
    ("qwen2-moe", "tp2"),
    ("qwen2-moe-fused", "tp1"),
    ("qwen3-moe", "tp1"),
    ("qwen3-moe", "tp2ep2"),
]


def _tiny_hf_model(name: str):
    config_class, extra, _ = CASES[name]
    return tiny_model(config_class(**{**BASE, **extra}))


def _save(name: str, folder):
    model = _tiny_hf_model(name)
    model.save_pretrained(folder, max_shard_size="200KB" if name == "mixtral" else "1GB")
    if CASES[name][
        2
    ]:  # replace the per-expert file by the fused tensors transformers holds in memory
        for file in folder.glob("*.safetensors"):
            file.unlink()
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            folder / "model.safetensors",
            metadata={"format": "pt"},
        )
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_each(tmp_path_factory, CASES, _save)


def test_routing_settings_follow_the_config(converted):
    """Mixtral always renormalizes the top k; Qwen only with norm_topk_prob (else softmax first)."""
    expected = {
        "mixtral": (4, 2, False, None),
        "qwen2-moe": (8, 2, True, 48),
        "qwen2-moe-fused": (6, 3, False, 48),
        "qwen3-moe": (8, 3, False, None),
    }
    for name, (hf_dir, _) in converted.items():
        model = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
        assert (
            model.num_experts,
            model.moe_router_topk,
            model.moe_router_pre_softmax,
            model.moe_shared_expert_intermediate_size,
        ) == expected[name]
    assert hf_convert.hf_moe.is_fused(
        hf_convert.SafetensorsFolder(converted["qwen2-moe-fused"][0]).weight_map
    )
    assert len(set(hf_convert.SafetensorsFolder(converted["mixtral"][0]).weight_map.values())) > 1


@pytest.mark.parametrize("name,layout", RUNS)
def test_moe_logits_match_transformers(converted, name, layout):
    hf_dir, megatron_dir = converted[name]
    tokens = random_tokens(BASE["vocab_size"])
    world_size, overrides = LAYOUTS[layout]
    ours = megamft_logits(megatron_dir, tokens, world_size, overrides)
    theirs = hf_logits(hf_dir, tokens)
    torch.testing.assert_close(ours[..., : BASE["vocab_size"]], theirs, rtol=0, atol=1e-4)


def _load_quietly(folder):
    """Load with transformers, returning (model, loading info, warnings it logged or raised)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, output_loading_info=True
            )
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    messages += [str(w.message) for w in caught if "transformers" in str(w.filename)]
    return model, info, messages


@pytest.mark.parametrize("name", ["qwen2-moe", "qwen2-moe-fused", "qwen3-moe"])
def test_export_loads_in_transformers_without_warnings(converted, name, tmp_path):
    hf_dir, megatron_dir = converted[name]
    exported = hf_convert.megatron_to_hf(megatron_dir, tmp_path / "export", hf_template=hf_dir)
    model, info, messages = _load_quietly(exported)
    assert not any(info.values()), info
    assert not messages, messages
    tokens = random_tokens(BASE["vocab_size"])
    torch.testing.assert_close(
        hf_logits(exported, tokens), hf_logits(hf_dir, tokens), rtol=0, atol=0
    )
    # The round trip gives back the very tensors; read fused, written per expert: what transformers itself writes
    if CASES[name][2]:
        _tiny_hf_model(name).save_pretrained(tmp_path / "reference")
        reference = load_file(tmp_path / "reference" / "model.safetensors")
    else:
        reference = load_file(hf_dir / "model.safetensors")
    written = load_file(exported / "model-00001-of-00001.safetensors")
    assert set(written) == set(reference)
    assert all(torch.equal(written[k], reference[k]) for k in reference)


def test_round_trip_through_ep2_pp2_is_bit_identical(converted, tmp_path):
    hf_dir, megatron_dir = converted["mixtral"]
    resaved = tmp_path / "ep2pp2"
    resave(
        megatron_dir,
        ("parallel.expert_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"),
        resaved,
        timeout=240,
    )
    exported = hf_convert.megatron_to_hf(resaved, tmp_path / "hf_out", hf_template=hf_dir)
    original = sharded_tensors(hf_dir)
    back = sharded_tensors(exported)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    _, info, messages = _load_quietly(exported)
    assert not any(info.values()) and not messages, (info, messages)


def test_unsupported_moe_layouts_are_refused(converted):
    from megamft.model.families import UnsupportedModel

    config = json.loads((converted["qwen2-moe"][0] / "config.json").read_text())
    with pytest.raises(UnsupportedModel, match="mlp_only_layers"):
        model_config_from_hf({**config, "mlp_only_layers": [1]})
    mixtral = json.loads((converted["mixtral"][0] / "config.json").read_text())
    with pytest.raises(UnsupportedModel, match="router_jitter_noise"):
        model_config_from_hf({**mixtral, "router_jitter_noise": 0.1})


# Qwen/Qwen3-Coder-30B-A3B-Instruct's config.json, as published (keys transformers ignores included).
QWEN3_CODER_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 5472,
    "max_position_embeddings": 262144,
    "max_window_layers": 28,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "qkv_bias": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000,
    "router_aux_loss_coef": 0.0,
    "shared_expert_intermediate_size": 0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_qk_norm": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_qwen3_coder_config_reads_as_transformers_builds_it():
    """The published Qwen3-Coder-30B-A3B config gives the model transformers builds from it."""
    from megamft.sizing.architecture import head_dim

    model = model_config_from_hf(QWEN3_CODER_30B_A3B)
    hf = transformers.Qwen3MoeConfig(**QWEN3_CODER_30B_A3B)
    assert (model.num_experts, model.moe_router_topk, model.moe_ffn_hidden_size) == (
        hf.num_experts,
        hf.num_experts_per_tok,
        hf.moe_intermediate_size,
    )
    assert (
        model.moe_router_pre_softmax is not hf.norm_topk_prob
    )  # renormalized top-k: softmax over the top k
    assert (
        model.moe_shared_expert_intermediate_size is None
    )  # no shared expert in Qwen3MoeSparseMoeBlock
    assert (head_dim(model), model.qk_layernorm, model.add_qkv_bias) == (
        hf.head_dim,
        True,
        hf.attention_bias,
    )
    assert (model.num_layers, model.num_query_groups, model.rotary_base, model.sliding_window) == (
        hf.num_hidden_layers,
        hf.num_key_value_heads,
        hf.rope_parameters["rope_theta"],
        hf.sliding_window,
    )
    # A switched-on window applies to every Qwen3-MoE layer (its attention ignores max_window_layers)
    windowed = {**QWEN3_CODER_30B_A3B, "use_sliding_window": True, "sliding_window": 4096}
    assert (
        model_config_from_hf(windowed).sliding_window
        == transformers.Qwen3MoeConfig(**windowed).sliding_window
    )


def test_unsupported_qwen3_moe_layouts_are_refused():
    from megamft.model.families import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="mlp_only_layers"):
        model_config_from_hf({**QWEN3_CODER_30B_A3B, "mlp_only_layers": [0, 47]})
    with pytest.raises(UnsupportedModel, match="decoder_sparse_step"):
        model_config_from_hf({**QWEN3_CODER_30B_A3B, "decoder_sparse_step": 2})


def test_parameter_count_of_the_estimator_equals_transformers(converted):
    """The memory estimator's parameter count (experts, router, shared expert, q/k norms) against the model."""
    for name, (hf_dir, _) in converted.items():
        ours, theirs = parameter_counts(hf_dir)
        assert ours == theirs, name
