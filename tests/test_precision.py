"""fp16 trains: the loss scale reaches backward, gradients come back unscaled, calibration is reported.

megatron's schedule multiplies the loss by ``config.grad_scale_func`` before
backward and its optimizer divides every gradient by the loss scale
(megatron/core/pipeline_parallel/schedules.py ``backward_step``;
megatron/core/optimizer/optimizer.py ``MixedPrecisionOptimizer._unscale_main_grads_and_check_for_nan``).
Without the hook, fp16 gradients were divided by a scale that was never applied
(2^32 at start) and vanished: grad-norm 0.000 at every step, nothing learned.
The reference is an fp32 run from the same weights on the same batches.
"""

import os

import jobs
import precision_jobs
import pytest
from training_runs import ROOT

from megamft.testing.distributed import launch
from megamft.testing.forked_command import run_module


@pytest.fixture(scope="module")
def fp32_first_step(initial_weights):
    return launch(
        precision_jobs.first_step_main_gradients,
        1,
        kwargs={"weights": initial_weights, "precision": "fp32"},
    )[0]


def test_fp16_main_gradients_equal_fp32_after_unscaling(fp32_first_step, initial_weights):
    # A loss scale that does not overflow on this model, so the first step is taken.
    got = launch(
        precision_jobs.first_step_main_gradients,
        1,
        kwargs={
            "weights": initial_weights,
            "precision": "fp16",
            "overrides": ("optimizer.initial_loss_scale=256",),
        },
    )[0]
    want = fp32_first_step["grads"]
    assert not got["skipped"] and got["loss_scale"] == 256
    assert set(got["grads"]) == set(want)
    for name, grad in want.items():
        assert grad.norm() > 0, name
        error = (got["grads"][name] - grad).norm() / grad.norm()
        assert error < 2e-2, (
            name,
            float(error),
        )  # fp16 activations: ~1e-3 typical; unscaled-by-256 would be ~1
    assert (
        abs(got["grad_norm"] - fp32_first_step["grad_norm"]) <= 2e-2 * fp32_first_step["grad_norm"]
    )


def _train(initial_weights, *overrides):
    common = (
        "train.train_steps=8",
        "train.log_interval=4",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        "optimizer.lr=3e-3",
    )
    return launch(jobs.train, 1, kwargs={"overrides": common + overrides}, timeout=300)[0]


def test_fp16_learns_as_fp32_does(initial_weights):
    fp32 = _train(initial_weights)
    fp16 = _train(initial_weights, "train.precision=fp16", "optimizer.initial_loss_scale=256")
    learned = fp32["valid_before"] - fp32["valid_after"]
    assert learned > 0.5, fp32  # the run really learns, so "close" below means something
    assert abs(fp16["valid_after"] - fp32["valid_after"]) < 0.1 * learned, (fp16, fp32)
    assert all(g and g > 0 for g in fp16["grad_norm"])


def _cli(tmp_path, *overrides):
    args = [
        "train",
        *jobs.TINY_MODEL,
        "train.train_steps=6",
        "data.valid_samples_per_task=2",
        "train.precision=fp16",
        *overrides,
    ]
    return run_module("megamft", args, dict(os.environ), ROOT, timeout=300)


@pytest.mark.slow
def test_loss_scale_calibration_is_counted_not_fatal(tmp_path):
    # megatron's own first scale, 2^32, overflows: the scaler halves it step by step. Those skips are
    # reported and do not count against train.max_skipped_steps (3 here, fewer than the skips).
    done = _cli(tmp_path, "optimizer.initial_loss_scale=4294967296", "train.max_skipped_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("skipped by the fp16 loss scaler") == 6, done.stderr[-3000:]
    assert "steps skipped by the fp16 loss scaler: 6" in done.stdout


@pytest.mark.slow
def test_a_step_that_learns_nothing_is_reported(tmp_path):
    # A loss scale so small that every fp16 gradient underflows to exactly zero.
    done = _cli(tmp_path, "optimizer.initial_loss_scale=1e-30", "optimizer.min_loss_scale=1e-30")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the gradient norm is exactly 0" in done.stderr, done.stderr[-3000:]
