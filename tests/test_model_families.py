"""Family data without processes: RoPE variants, sliding windows, refusals (see test_hf_families for logits)."""

import importlib.util
import types

import pytest
import torch

from megamft.config import ConfigError, MegamftConfig, ModelConfig, validate
from megamft.model.attention_window import check_backend_honours_window, window_size
from megamft.model.families import UnsupportedModel, model_config_from_hf
from megamft.model.rope import apply_llama3_scaling
from megamft.model.spec import attention_backend_for

transformers = pytest.importorskip("transformers")

SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
)


def _hf(architecture: str, **keys) -> dict:
    return {"architectures": [architecture], **SIZES, **keys}


def test_llama3_frequencies_follow_the_configs_values_not_megatrons_defaults():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # meta-llama/Llama-3.2-1B's rope keys, with values unlike megatron-core's hard-coded 1, 4 and 8192.
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    model = model_config_from_hf(_hf("LlamaForCausalLM", rope_parameters=rope))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](
        transformers.LlamaConfig(**SIZES, rope_parameters=rope), "cpu"
    )

    def rotary(**kwargs):
        return RotaryEmbedding(
            kv_channels=16,
            rotary_percent=1.0,
            rotary_base=500000.0,
            use_cpu_initialization=True,
            **kwargs,
        )

    ours = types.SimpleNamespace(rotary_pos_emb=rotary())
    apply_llama3_scaling(ours, model)
    torch.testing.assert_close(ours.rotary_pos_emb.inv_freq, theirs, rtol=1e-6, atol=0)
    megatrons_own = rotary(rope_scaling=True, rope_scaling_factor=8.0).inv_freq
    assert not torch.allclose(
        megatrons_own, theirs
    )  # the test values are ones megatron would get wrong


@pytest.mark.parametrize(
    "architecture,rope,kind",
    [
        ("Qwen3ForCausalLM", {"type": "dynamic", "factor": 2.0}, "dynamic"),
        (
            "Qwen3ForCausalLM",
            {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
            "longrope",
        ),
        # microsoft/Phi-3-mini-128k-instruct's keys: Phi-3 calls LongRoPE "su" (and "yarn"), as transformers reads it
        (
            "Phi3ForCausalLM",
            {"type": "su", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
            "longrope",
        ),
        (
            "Phi3ForCausalLM",
            {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
            "longrope",
        ),
    ],
)
def test_unsupported_rope_types_are_refused_by_name(architecture, rope, kind):
    with pytest.raises(
        UnsupportedModel,
        match=rf"config.json: RoPE scaling type '{kind}' is not supported "
        r"\(rope_scaling's type",
    ):
        model_config_from_hf(_hf(architecture, rope_scaling=rope))


def test_partial_rotary_embeddings_are_refused():
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor 0.5"):
        model_config_from_hf(_hf("Phi3ForCausalLM", partial_rotary_factor=0.5))


def test_llama3_scaling_needs_all_its_values():
    with pytest.raises(UnsupportedModel, match="low_freq_factor"):
        model_config_from_hf(
            _hf("LlamaForCausalLM", rope_scaling={"rope_type": "llama3", "factor": 8.0})
        )
    model = ModelConfig(
        rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_llama3_low_freq_factor=1.0
    )
    with pytest.raises(
        ConfigError,
        match="model.rope_llama3_high_freq_factor, "
        "model.rope_llama3_original_max_position_embeddings",
    ):
        validate(MegamftConfig(model=model), 1)


def test_starcoder2_takes_transformers_defaults_for_missing_keys():
    model = model_config_from_hf(_hf("Starcoder2ForCausalLM", norm_epsilon=1e-5))
    assert model.tie_embeddings and model.add_bias_linear  # Starcoder2Config's defaults
    with pytest.raises(
        UnsupportedModel, match="hidden_act 'gelu'; Starcoder2ForCausalLM .* 'gelu_pytorch_tanh'"
    ):
        model_config_from_hf(_hf("Starcoder2ForCausalLM", hidden_act="gelu"))


def test_windows_apply_to_the_layers_transformers_windows():
    base = _hf("Qwen3ForCausalLM", sliding_window=4096)

    def windows(hf: dict):
        model = model_config_from_hf(hf)
        return model.sliding_window, model.sliding_window_layers

    assert windows({**base, "use_sliding_window": False}) == (None, None)
    assert windows({**base, "use_sliding_window": True, "max_window_layers": 0}) == (4096, None)
    assert windows({**base, "use_sliding_window": True, "max_window_layers": 2}) == (None, None)
    assert windows({**base, "use_sliding_window": True, "max_window_layers": 1}) == (
        4096,
        [False, True],
    )
    # Mistral's transformers model ignores layer_types: its window applies to every layer
    assert windows(
        _hf("MistralForCausalLM", sliding_window=64, layer_types=["full_attention"] * 2)
    ) == (64, None)
    # Gemma 2 without layer_types alternates, windowed first (Gemma2Config's own rule)
    gemma2 = {**_hf("Gemma2ForCausalLM", num_hidden_layers=4, head_dim=16), "sliding_window": 64}
    theirs = transformers.Gemma2Config(
        **{k: v for k, v in gemma2.items() if k != "architectures"}
    ).layer_types
    assert (
        windows(gemma2)
        == (64, [kind == "sliding_attention" for kind in theirs])
        == (64, [True, False] * 2)
    )


def _windowed(window: int, seq: int, mode: str = "pad", **transformer) -> MegamftConfig:
    cfg = MegamftConfig(model=ModelConfig(sliding_window=window, max_position_embeddings=4096))
    cfg.data.seq_length, cfg.data.mode, cfg.transformer = seq, mode, transformer
    return cfg


def test_window_goes_to_megatron_only_when_shorter_than_the_sequence():
    assert window_size(_windowed(4096, 1024)) is None
    assert window_size(_windowed(4096, 4096)) is None
    assert window_size(_windowed(512, 1024)) == (511, 0)  # HF's window counts the token itself


def test_local_attention_refuses_what_would_drop_the_window_or_document_mask():
    check_backend_honours_window(_windowed(512, 1024, "pad"), backend="local")
    check_backend_honours_window(_windowed(512, 1024, "pack"), backend="te")
    check_backend_honours_window(_windowed(2048, 1024, "pack"), backend="local")
    with pytest.raises(ValueError, match=r"model.sliding_window \(512\) .* data.mode=pack"):
        check_backend_honours_window(_windowed(512, 1024, "pack"), backend="local")
    with pytest.raises(ValueError, match="transformer.masked_softmax_fusion"):
        check_backend_honours_window(
            _windowed(512, 1024, masked_softmax_fusion=True), backend="local"
        )
    check_backend_honours_window(
        _windowed(512, 1024, "pack"), backend="torch"
    )  # varlen's window / banded SDPA
    # auto picks torch for a windowed model without Transformer Engine, as for any other
    assert attention_backend_for(_windowed(512, 1024, "pack"), te_installed=False) == "torch"
    assert attention_backend_for(_windowed(512, 1024, "pack"), te_installed=True) == "te"
    cfg = _windowed(512, 1024)
    cfg.parallel.context_parallel_size = 2
    with pytest.raises(ConfigError, match="parallel.context_parallel_size=2"):
        validate(cfg, 2)


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None,
    reason="Transformer Engine's layer spec needs Transformer Engine (GPU machines)",
)
def test_te_and_local_moe_layers_save_their_mlp_norm_under_one_key():
    from megamft.model.spec import local_block_spec, transformer_engine_layer_spec

    te = transformer_engine_layer_spec(num_experts=4).submodules.sharded_state_dict_keys_map
    local = local_block_spec(2, num_experts=4).layer_specs[0].submodules.sharded_state_dict_keys_map
    assert te["pre_mlp_layernorm."] == local["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"
