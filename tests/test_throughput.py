"""The FLOP count behind TFLOP/s and MFU agrees with torch's own FLOP counter."""

import jobs
import pytest

from megamft.testing.distributed import launch

# StarCoder2's LayerNorm and GELU MLP and Qwen3's heads wider than hidden / heads. Linear biases are left
# out: they add no matmul FLOPs, and under FlopCounterMode stacked on the strict device emulation the bias
# gradient of megatron's linear comes back untagged (the same model trains without the counter).
VARIANTS = {
    "llama": (),
    "starcoder2-qwen3-variants": (
        "model.normalization=LayerNorm",
        "model.mlp_activation=gelu_tanh",
        "model.kv_channels=16",
        "model.qk_layernorm=true",
    ),
    # Mixture of experts: the router, the top-2 of 4 routed experts and a gated shared expert.
    "moe": (
        "model.num_experts=4",
        "model.moe_router_topk=2",
        "model.moe_ffn_hidden_size=48",
        "model.moe_shared_expert_intermediate_size=32",
        "model.moe_shared_expert_gate=true",
    ),
    # Frozen weights: autograd skips their weight-gradient matmuls; the adapters train.
    "lora": ("lora.enabled=true", "lora.rank=4"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_flops_match_torch_flop_counter(variant, monkeypatch):
    """torch's counter runs on megatron's local attention (it does not count the CPU kernels behind SDPA),
    which computes the full s x s scores of each row: model FLOPs, which count the causal pairs only,
    plus the masked pairs local attention still multiplies must equal torch's count."""
    if variant == "moe":
        # FlopCounterMode stacked on the strict emulation loses the device tag of the experts' index_add
        # output; this test counts FLOPs, not placements (MoE training runs strict in test_moe_training).
        monkeypatch.setenv("MEGAMFT_STRICT_DEVICE", "0")
    overrides = ("model.attention_backend=local", *VARIANTS[variant])
    out = launch(jobs.counted_training_flops, 1, timeout=180, kwargs={"overrides": overrides})[0]
    s = out["seq"]
    future_pairs = s * s - s * (s + 1) // 2  # per row: the masked scores local still multiplies
    local_extra = 3 * out["layers"] * 2 * 2 * out["query_width"] * future_pairs / s
    assert abs(out["model_flops"] + local_extra - out["counted"]) <= 0.03 * out["counted"], out
