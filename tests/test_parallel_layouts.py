"""Parallelism is real and exact: every layout computes the same training run.

One set of initial weights is loaded into each (TP, PP, DP) layout through a
dist checkpoint (resharded on load by megatron); the same global batches are
trained for two steps. Loss and gradient norm must match the single-process
run to 1e-5 relative (fp32), which holds only if TP/PP/DP split and reduce
everything correctly.
"""

import jobs
import pytest

from megamft.testing.distributed import launch

STEPS = 2
LAYOUTS = {
    # name: (world size, overrides)
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "dp2": (2, []),
    "tp2-pp2": (
        4,
        ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
    ),
    "tp2-sequence-parallel": (
        2,
        ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    ),
    "tp2-fused-cross-entropy": (
        2,
        ["parallel.tensor_model_parallel_size=2", "loss.fused_cross_entropy=true"],
    ),
    "pp2-interleaved": (
        2,
        [
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
        ],
    ),
    "tp2-dp2-overlap-recompute": (
        4,
        [
            "parallel.tensor_model_parallel_size=2",
            "ddp.overlap_grad_reduce=true",
            "transformer.recompute_granularity=full",
            "transformer.recompute_method=uniform",
            "transformer.recompute_num_layers=1",
        ],
    ),
}


def _run(world_size, overrides, weights):
    common = [
        f"train.train_steps={STEPS}",
        f"checkpoint.load_dir={weights}",
        "checkpoint.load_optimizer=false",
    ]
    return launch(
        jobs.train, world_size, kwargs={"overrides": tuple(common + overrides)}, timeout=240
    )


@pytest.fixture(scope="module")
def reference(initial_weights):
    return _run(1, [], initial_weights)[0]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, initial_weights):
    world_size, overrides = LAYOUTS[layout]
    results = _run(world_size, overrides, initial_weights)
    for rank, got in enumerate(results):  # every rank reports the same global numbers
        for step in range(STEPS):
            assert _rel(got["loss"][step], reference["loss"][step]) <= 1e-5, (
                rank,
                step,
                got,
                reference,
            )
            assert _rel(got["grad_norm"][step], reference["grad_norm"][step]) <= 1e-5, (rank, step)
            assert got["tokens"][step] == reference["tokens"][step]
        assert _rel(got["valid_before"], reference["valid_before"]) <= 1e-5
        assert _rel(got["valid_after"], reference["valid_after"]) <= 1e-5


def test_training_moves_the_loss(reference):
    # Guards against a vacuous match (e.g. nothing trained in any layout).
    assert reference["loss"][0] > 4.0  # ~ln(vocab) for an untrained model
    assert reference["grad_norm"][0] > 0
    assert (
        reference["valid_after"] < reference["valid_before"]
    )  # same validation rows, after two updates


def test_bf16_with_fp32_master_weights_tracks_fp32(reference, initial_weights):
    got = _run(
        2, ["parallel.tensor_model_parallel_size=2", "train.precision=bf16"], initial_weights
    )[0]
    for step in range(STEPS):
        assert _rel(got["loss"][step], reference["loss"][step]) <= 2e-2, (
            got["loss"],
            reference["loss"],
        )
        assert got["loss"][step] != reference["loss"][step]  # it really ran in bf16
