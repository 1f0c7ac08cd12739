"""The FLOP formula behind TFLOP/s and MFU agrees with torch's own FLOP counter."""

import pytest

from megamft.testing.distributed import launch

import jobs


# StarCoder2's LayerNorm and GELU MLP and Qwen3's heads wider than hidden / heads. Linear biases are left
# out: they add no matmul FLOPs, and under FlopCounterMode stacked on the strict device emulation the bias
# gradient of megatron's linear comes back untagged (the same model trains without the counter).
VARIANTS = {
    "llama": (),
    "starcoder2-qwen3-variants": ("model.normalization=LayerNorm", "model.mlp_activation=gelu_tanh",
                                  "model.kv_channels=16", "model.qk_layernorm=true"),
    # Mixture of experts: the router, the top-2 of 4 routed experts and a gated shared expert.
    "moe": ("model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=48",
            "model.moe_shared_expert_intermediate_size=32", "model.moe_shared_expert_gate=true"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flops_per_token_matches_torch_flop_counter(variant, monkeypatch):
    if variant == "moe":
        # FlopCounterMode stacked on the strict emulation loses the device tag of the experts' index_add
        # output; this test counts FLOPs, not placements (MoE training runs strict in test_moe_training).
        monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "0")
    # megatron's local attention: torch's FLOP counter does not count the CPU kernels behind SDPA, which
    # the torch backend uses; the formula's attention term counts the same scores either way.
    overrides = ("model.attention_backend=local", *VARIANTS[variant])
    out = launch(jobs.counted_training_flops, 1, timeout=180, kwargs={"overrides": overrides})[0]
    assert abs(out["formula"] - out["counted"]) <= 0.05 * out["counted"], out


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_model_flops_count_causal_pairs_and_frozen_weights(variant):
    """torch's counter on the local backend sees the full s x s scores of each row, and, with LoRA,
    no weight-gradient matmul for frozen weights (autograd skips them). Model FLOPs plus the
    non-causal half of the scores that local computes must equal that count."""
    lora = ("lora.enabled=true", "lora.rank=4") if variant == "lora" else ()
    out = launch(jobs.counted_training_flops, 1, timeout=180,
                 kwargs={"overrides": ("model.attention_backend=local", *lora)})[0]
    s = out["seq"]
    future_pairs = s * s - s * (s + 1) // 2  # per row: the masked scores local still multiplies
    local_extra = 3 * out["layers"] * 2 * 2 * out["query_width"] * future_pairs / s
    assert abs(out["model_flops"] + local_extra - out["counted"]) <= 0.03 * out["counted"], out
    if variant == "lora":  # frozen weights: about 2/3 of a full fine-tune's count
        assert out["model_flops"] < 0.75 * out["formula"], out
