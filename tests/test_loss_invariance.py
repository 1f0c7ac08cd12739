"""Every loss mode gives the same loss and gradients however the global batch is cut.

The real megatron training step on packed rows (several documents of several
tasks per row, block-diagonal attention): micro-batch 8 x accumulation 1,
micro-batch 1 x accumulation 8, and DP=2 x micro-batch 1 x accumulation 4,
from the same weights. fp32, relative difference at most 1e-5.
"""

import jobs
import pytest
import torch

from megamft.loss.multitask import MODES
from megamft.testing.distributed import launch


@pytest.fixture(scope="module")
def runs(initial_weights):
    def step(world, micro_batch_size):
        return launch(
            jobs.loss_modes_step,
            world,
            timeout=300,
            kwargs=dict(
                weights_dir=initial_weights, micro_batch_size=micro_batch_size, modes=MODES
            ),
        )[0]

    return {"mb8x1": step(1, 8), "mb1x8": step(1, 1), "dp2": step(2, 1)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["mb1x8", "dp2"])
def test_loss_and_gradients_do_not_depend_on_the_cut(runs, mode, layout):
    want, got = runs["mb8x1"][mode], runs[layout][mode]
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])
    assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"]
    torch.testing.assert_close(
        got["grads"], want["grads"], rtol=1e-5, atol=1e-5 * want["grads"].abs().max().item()
    )


def test_modes_really_differ(runs):
    losses = {mode: runs["mb8x1"][mode]["loss"] for mode in MODES}
    assert len({round(v, 6) for v in losses.values()}) == len(MODES), losses
    assert not torch.allclose(
        runs["mb8x1"]["famo"]["weights"], runs["mb8x1"]["task_token"]["weights"]
    )


def test_per_microbatch_normalization_does_depend_on_the_cut(initial_weights):
    """MFTCoder's per-micro-batch normalization is kept for comparison; it is not split-invariant."""

    def step(micro_batch_size):
        return launch(
            jobs.loss_modes_step,
            1,
            timeout=300,
            kwargs=dict(
                weights_dir=initial_weights,
                micro_batch_size=micro_batch_size,
                modes=("task_token",),
                normalization="per_microbatch",
            ),
        )[0]["task_token"]["loss"]

    whole, cut = step(8), step(1)
    exact = launch(
        jobs.loss_modes_step,
        1,
        timeout=300,
        kwargs=dict(weights_dir=initial_weights, micro_batch_size=8, modes=("task_token",)),
    )[0]["task_token"]["loss"]
    assert abs(whole - exact) <= 1e-6 * exact  # one micro-batch: both normalizations agree
    assert abs(cut - whole) > 1e-4 * whole
