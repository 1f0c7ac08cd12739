"""The memory estimator agrees with memory measured on the real model (CPU, within 20%)."""

import subprocess
import sys
from pathlib import Path

import jobs
import pytest

from megamft.testing.distributed import launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "world_size,overrides",
    [
        (1, ()),
        (2, ("parallel.tensor_model_parallel_size=2",)),
        (2, ("parallel.tensor_model_parallel_size=2", "lora.enabled=true", "lora.rank=4")),
        # QLoRA's 4-bit base, and adapters with dropout (each keeps its dropped input and mask)
        (
            2,
            (
                "parallel.tensor_model_parallel_size=2",
                "lora.enabled=true",
                "lora.rank=4",
                "lora.quantize_base=nf4",
                "lora.dropout=0.1",
                "train.precision=bf16",
            ),
        ),
        # StarCoder2's LayerNorm, biases and GELU MLP with Qwen3's wide heads and q/k norms, in one model.
        (
            1,
            (
                "model.normalization=LayerNorm",
                "model.add_bias_linear=true",
                "model.mlp_activation=gelu_tanh",
                "model.kv_channels=16",
                "model.qk_layernorm=true",
            ),
        ),
        (
            2,
            (
                "model.num_experts=4",
                "model.moe_ffn_hidden_size=48",
                "parallel.expert_model_parallel_size=2",
            ),
        ),
    ],
)
def test_estimate_matches_measured_memory(world_size, overrides):
    measured = launch(
        jobs.measured_memory, world_size, timeout=180, kwargs={"overrides": overrides}
    )[0]
    for part, (real, estimated) in measured.items():
        assert abs(estimated - real) <= 0.2 * real, (part, real, estimated)


def test_cli_prints_an_estimate_for_an_example():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "estimate_memory.py"),
            "--config",
            str(ROOT / "examples" / "quickstart.yaml"),
            "--world-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GB per device" in proc.stdout


def test_torch_attention_memory_grows_linearly_and_local_quadratically():
    """benchmarks/attention_memory.py: peak device memory of core attention (forward + backward) at seq 512 and 2048."""
    import json

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "attention_memory.py"),
            "--seq",
            "512",
            "2048",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth["torch"] < 5, growth  # x4 the sequence: linear is x4
    assert growth["local"] > 12, growth  # quadratic is x16


def test_estimate_knows_which_backends_keep_the_attention_scores():
    from megamft.config import load_config
    from megamft.sizing.memory import estimate

    def activations(backend, seq):
        cfg = load_config([], [f"model.attention_backend={backend}", f"data.seq_length={seq}"])
        return estimate(cfg, 1, 256).activations

    for backend in ("torch", "te", "auto"):  # linear: doubling the sequence doubles the activations
        assert activations(backend, 2048) / activations(backend, 1024) < 2.01
    assert (
        activations("local", 2048) / activations("local", 1024) > 3
    )  # mostly the [s, s] probabilities
