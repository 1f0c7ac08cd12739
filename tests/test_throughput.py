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
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flops_per_token_matches_torch_flop_counter(variant):
    out = launch(jobs.counted_training_flops, 1, timeout=180, kwargs={"overrides": VARIANTS[variant]})[0]
    assert abs(out["formula"] - out["counted"]) <= 0.05 * out["counted"], out
