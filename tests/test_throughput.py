"""The FLOP formula behind TFLOP/s and MFU agrees with torch's own FLOP counter."""

from megamft.testing.distributed import launch

import jobs


def test_flops_per_token_matches_torch_flop_counter():
    out = launch(jobs.counted_training_flops, 1, timeout=180)[0]
    assert abs(out["formula"] - out["counted"]) <= 0.05 * out["counted"], out
