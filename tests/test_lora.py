"""TP-aware LoRA: merged equals adapters, TP=2 equals TP=1, only adapters train, export merges."""

import pytest
import torch

from megamft.testing.distributed import launch

import jobs

LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8")


@pytest.mark.parametrize("world_size,layout", [(1, ()), (2, ("parallel.tensor_model_parallel_size=2",)),
                                               (2, ("parallel.tensor_model_parallel_size=2",
                                                    "parallel.sequence_parallel=true"))])
def test_adapters_train_alone_and_merge_exactly(initial_weights, world_size, layout):
    out = launch(jobs.lora_checks, world_size, timeout=240,
                 kwargs={"overrides": layout, "weights_dir": initial_weights})[0]
    assert out["trainable"] and all(".lora_" in n for n in out["trainable"])
    assert out["changed"] and all(".lora_" in n for n in out["changed"])  # the base stayed frozen
    assert out["optimizer_params"] == out["adapter_params"]
    torch.testing.assert_close(out["merged"], out["with_adapters"], rtol=1e-5, atol=1e-5)


def test_lora_at_tp2_matches_tp1(initial_weights):
    common = LORA + ("train.train_steps=3", f"checkpoint.load_dir={initial_weights}",
                     "checkpoint.load_optimizer=false")
    one = launch(jobs.train, 1, timeout=240, kwargs={"overrides": common})[0]
    two = launch(jobs.train, 2, timeout=240, kwargs={"overrides": common + (
        "parallel.tensor_model_parallel_size=2",)})[0]
    assert one["loss"][2] != one["loss"][0]
    for a, b in zip(one["loss"] + one["grad_norm"], two["loss"] + two["grad_norm"]):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
