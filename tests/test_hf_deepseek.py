"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM): multi-latent attention and its MoE, proven against transformers.

Tiny random models with DeepSeek's structure (megatron-core's MLASelfAttention with and without the query
low-rank projection, YaRN on the RoPE part with DeepSeek's mscale, shared experts, dense first layers,
routed-weight scaling, group-limited routing) are converted and run by megamft at TP=1, TP=2 (sequence
parallel), PP=2, EP=2 and TP=2 x EP=2: the logits must equal transformers'. Dense first layers make megatron
save each layer under its own keys (non-homogeneous layers), which the converter writes and reads.
"""

import json

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
from megamft.config import ConfigError, MegamftConfig, validate  # noqa: E402
from megamft.model.families import UnsupportedModel, model_config_from_hf  # noqa: E402
from megamft.testing.distributed import launch  # noqa: E402

VOCAB, SEQ = 320, 24
BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    n_shared_experts=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    first_k_dense_replace=1,
    initializer_range=0.1,
)  # weights large enough that RoPE, YaRN's softmax scale and routing show in logits
CASES = {
    # deepseek-ai/DeepSeek-V2-Lite's structure: no query low-rank projection, greedy top-k, plain RoPE here
    # (values narrower than queries and keys: v_head_dim 10 against 8 + 4)
    "v2-lite": dict(
        BASE,
        num_hidden_layers=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        q_lora_rank=None,
        v_head_dim=10,
    ),
    # deepseek-ai/DeepSeek-V2's: query low-rank projection, YaRN with mscale = mscale_all_dim (0.707 there),
    # routed_scaling_factor, group-limited routing (3 experts from the best 2 of 4 groups, groups ranked by their
    # best expert: num_experts_per_tok // topk_group = 1, where megatron ranks them alike)
    "v2": dict(
        BASE,
        num_hidden_layers=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        q_lora_rank=24,
        routed_scaling_factor=2.5,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 8,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "rope_theta": 10000.0,
        },
    ),
}
LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
    "ep2": (2, ("parallel.expert_model_parallel_size=2",)),
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


def _save(name: str, folder):
    tiny_model(transformers.DeepseekV2Config(**CASES[name])).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_each(tmp_path_factory, CASES, _save)


def _checkpoints(converted):
    return [(str(m), str(m / "megamft_model.yaml")) for _, m in converted.values()]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(converted, layout):
    world_size, overrides = LAYOUTS[layout]
    tokens = [random_tokens(VOCAB, SEQ) for _ in CASES]
    results = launch(
        jobs.converted_logits_of_each,
        world_size,
        timeout=300,
        kwargs=dict(checkpoints=_checkpoints(converted), overrides=overrides, tokens=tokens),
    )
    ours = next(r for r in results if r is not None)
    for (name, (hf_dir, _)), mine, case_tokens in zip(converted.items(), ours, tokens):
        torch.testing.assert_close(
            mine[..., :VOCAB], hf_logits(hf_dir, case_tokens), rtol=0, atol=1e-4, msg=name
        )


def test_converted_model_sections(converted):
    lite = hf_convert.plan_hf_to_megatron(converted["v2-lite"][0])[0]
    v2 = hf_convert.plan_hf_to_megatron(converted["v2"][0])[0]
    assert (
        lite.multi_latent_attention,
        lite.q_lora_rank,
        lite.kv_lora_rank,
        lite.qk_head_dim,
        lite.qk_pos_emb_head_dim,
        lite.v_head_dim,
        lite.kv_channels,
    ) == (True, None, 16, 8, 4, 10, None)
    assert (
        lite.num_experts,
        lite.moe_router_topk,
        lite.moe_router_pre_softmax,
        lite.moe_first_dense_layers,
        lite.moe_shared_expert_intermediate_size,
        lite.moe_shared_expert_gate,
    ) == (4, 2, True, 1, 64, False)
    assert (
        v2.q_lora_rank,
        v2.moe_router_topk_scaling_factor,
        v2.moe_router_num_groups,
        v2.moe_router_group_topk,
        v2.rope_scaling_type,
        v2.rope_yarn_mscale,
        v2.rope_yarn_mscale_all_dim,
    ) == (24, 2.5, 4, 2, "yarn", 0.707, 0.707)


def test_the_test_models_exercise_routing_and_yarn(converted):
    """Greedy routing, unscaled weights or plain RoPE would change the reference logits (so the logits test
    proves megatron's group routing, scaling factor and MLA YaRN, not just the dense parts)."""
    hf_dir, _ = converted["v2"]
    config = json.loads((hf_dir / "config.json").read_text())
    tokens = random_tokens(VOCAB, SEQ)
    reference = hf_logits(hf_dir, tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for change in (
        {"topk_method": "greedy"},
        {"routed_scaling_factor": 1.0},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ):
        changed = transformers.AutoModelForCausalLM.from_config(
            transformers.DeepseekV2Config(**{**config, **change}), dtype=torch.float32
        )
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(changed(tokens).logits, reference, atol=1e-3), change


def test_round_trip_through_tp2_pp2_ep2_is_bit_identical(converted, tmp_path):
    """Resaved from TP=2 x PP=2 x EP=2 with sequence parallel (MLA's projections in TP pieces, per-layer keys
    for a dense first layer, experts over two ranks), whose logits must also equal transformers', then exported
    with the Hugging Face folder as template: the same tensors, bit for bit."""
    out_dirs = [str(tmp_path / name) for name in CASES]
    tokens = [random_tokens(VOCAB, SEQ) for _ in CASES]
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
                "parallel.expert_model_parallel_size=2",
                "parallel.expert_tensor_parallel_size=1",
            ),
        ),
    )
    ours = next(r for r in results if r is not None)
    for (name, (hf_dir, _)), mine, case_tokens, resaved in zip(
        converted.items(), ours, tokens, out_dirs
    ):
        torch.testing.assert_close(
            mine[..., :VOCAB], hf_logits(hf_dir, case_tokens), rtol=0, atol=1e-4, msg=name
        )
        assert_exports_bit_identical(resaved, tmp_path / f"{name}_hf", hf_dir, name)


def test_conversion_stored_in_tp2_pp2_pieces_loads_exactly(converted, tmp_path):
    """Converted for TP=2 x PP=2 (MLA's projections stored in the pieces each TP rank holds, tp_pieces), read at
    that layout with EP=2 and at TP=1: the logits equal transformers'."""
    checkpoints = []
    for name, (hf_dir, _) in converted.items():
        out = hf_convert.hf_to_megatron(hf_dir, tmp_path / name, tp=2, pp=2).parent
        checkpoints.append((str(out), str(out / "megamft_model.yaml")))
    tokens = [random_tokens(VOCAB, SEQ) for _ in CASES]
    target = (
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.expert_model_parallel_size=2",
        "parallel.expert_tensor_parallel_size=1",
    )
    for world_size, overrides in ((4, target), (1, ())):
        results = launch(
            jobs.converted_logits_of_each,
            world_size,
            timeout=300,
            kwargs=dict(checkpoints=checkpoints, overrides=overrides, tokens=tokens),
        )
        ours = next(r for r in results if r is not None)
        for (name, (hf_dir, _)), mine, case_tokens in zip(converted.items(), ours, tokens):
            torch.testing.assert_close(
                mine[..., :VOCAB],
                hf_logits(hf_dir, case_tokens),
                rtol=0,
                atol=1e-4,
                msg=f"{name} at {overrides}",
            )


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_without_key_warnings(converted, name, tmp_path):
    hf_dir, megatron_dir = converted[name]
    assert_export_loads_in_transformers(
        hf_dir, megatron_dir, tmp_path / "export", random_tokens(VOCAB, SEQ)
    )


def test_parameter_count_of_the_estimator_equals_transformers(converted):
    """MLA's projections and latent norms, dense first layers, experts and shared experts."""
    for name, (hf_dir, _) in converted.items():
        ours, theirs = parameter_counts(hf_dir)
        assert ours == theirs, name


def test_what_megatron_would_compute_otherwise_is_refused(converted):
    config = json.loads((converted["v2"][0] / "config.json").read_text())
    with pytest.raises(
        UnsupportedModel,
        match=r"topk_method=group_limited_greedy with n_group=4, topk_group=2, "
        r"num_experts_per_tok=6",
    ):
        model_config_from_hf(
            {**config, "topk_group": 2, "num_experts_per_tok": 6}
        )  # V2's own: 6 of 3 groups
    with pytest.raises(UnsupportedModel, match="norm_topk_prob true"):
        model_config_from_hf({**config, "norm_topk_prob": True})
    model = model_config_from_hf(config)
    for override, fragment in (
        ({"attention_backend": "te"}, "model.attention_backend=te"),
        ({"rope_yarn_truncate": False}, "model.rope_yarn_truncate=false"),
    ):
        cfg = MegamftConfig(model=model)
        for key, value in override.items():
            setattr(cfg.model, key, value)
        with pytest.raises(ConfigError, match=fragment):
            validate(cfg, 1)
    cfg = MegamftConfig(model=model)
    cfg.lora.enabled = True
    with pytest.raises(
        ConfigError,
        match="lora.enabled with model.multi_latent_attention or model.moe_first_dense_layers",
    ):
        validate(cfg, 1)


# deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct's config.json, as published (keys transformers ignores included).
CODER_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def test_coder_v2_lite_config_reads_as_transformers_builds_it():
    """The published DeepSeek-Coder-V2-Lite config gives the model transformers builds from it (15.7B)."""
    from megamft.sizing.memory import stage_parameters

    model = model_config_from_hf(CODER_V2_LITE)
    hf = transformers.DeepseekV2Config(**CODER_V2_LITE)
    assert (
        model.q_lora_rank,
        model.kv_lora_rank,
        model.qk_head_dim,
        model.qk_pos_emb_head_dim,
        model.v_head_dim,
    ) == (hf.q_lora_rank, hf.kv_lora_rank, hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim)
    assert (
        model.num_experts,
        model.moe_router_topk,
        model.moe_ffn_hidden_size,
        model.moe_first_dense_layers,
        model.moe_shared_expert_intermediate_size,
    ) == (
        hf.n_routed_experts,
        hf.num_experts_per_tok,
        hf.moe_intermediate_size,
        hf.first_k_dense_replace,
        hf.n_shared_experts * hf.moe_intermediate_size,
    )
    rope = hf.rope_parameters
    assert (
        model.rope_scaling_type,
        model.rope_scaling_factor,
        model.rope_yarn_original_max_position_embeddings,
        model.rope_yarn_mscale,
        model.rope_yarn_mscale_all_dim,
    ) == (
        rope["rope_type"],
        rope["factor"],
        rope["original_max_position_embeddings"],
        rope["mscale"],
        rope["mscale_all_dim"],
    )
    with torch.device("meta"):
        theirs = sum(
            p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf).parameters()
        )
    ours = stage_parameters(MegamftConfig(model=model), model.vocab_size, first=True, last=True)
    assert ours == theirs
    with pytest.raises(UnsupportedModel, match="scoring_func='sigmoid'"):
        model_config_from_hf({**CODER_V2_LITE, "scoring_func": "sigmoid"})


@pytest.mark.slow
def test_fine_tuning_with_expert_parallelism_lowers_the_loss(converted):
    hf_dir, megatron_dir = converted["v2"]
    overrides = (
        "parallel.expert_model_parallel_size=2",
        "train.train_steps=4",
        "train.lr_warmup_steps=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=4",
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
