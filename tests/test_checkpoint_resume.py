"""A reshardable checkpoint saved at TP=2 resumes at TP=1 and at PP=2 without changing the run.

The uninterrupted TP=2 run is the reference: resuming from its step-1
checkpoint in another layout must reproduce its losses for the steps after,
which needs weights, optimizer moments, LR schedule and data position back.
The reference saves asynchronously (megatron's background writer, then
megamft's publish) in checkpoint.optimizer_format=reshardable, the format that
loads at any layout, from gradient buffers split into several buckets (as
ddp.overlap_grad_reduce does on a cluster). test_checkpoint_formats covers the
default, DP-sharded format, test_preemption synchronous saves.
"""

from pathlib import Path

import jobs
import pytest

from megamft.checkpoint.layout import iteration_dir, latest_iteration
from megamft.testing.distributed import launch

STEPS = 3


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def uninterrupted(initial_weights, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("tp2_run"))
    overrides = (
        "parallel.tensor_model_parallel_size=2",
        f"train.train_steps={STEPS}",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval=1",
        "checkpoint.async_save=true",
        "checkpoint.optimizer_format=reshardable",
        "ddp.overlap_grad_reduce=true",
        "ddp.bucket_size=6000",
    )
    result = launch(jobs.train, 2, kwargs={"overrides": overrides}, timeout=240)[0]
    return save_dir, result


def test_checkpoints_are_complete_and_pointed_to(uninterrupted):
    save_dir, _ = uninterrupted
    assert latest_iteration(save_dir) == STEPS
    for step in range(1, STEPS + 1):
        assert (iteration_dir(save_dir, step) / "metadata.json").is_file()
    assert not [p for p in Path(save_dir).iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(
    "world_size,layout",
    [
        (1, ()),
        (2, ("parallel.pipeline_model_parallel_size=2",)),
    ],
)
def test_resume_in_another_layout_continues_the_run(uninterrupted, world_size, layout):
    save_dir, reference = uninterrupted
    overrides = layout + (
        f"train.train_steps={STEPS}",
        f"checkpoint.load_dir={save_dir}",
        "checkpoint.load_iteration=1",
        "checkpoint.resume=never",
    )
    resumed = launch(jobs.train, world_size, kwargs={"overrides": overrides}, timeout=240)[0]
    assert len(resumed["loss"]) == STEPS - 1  # steps 2 and 3 only
    for got, want in zip(resumed["loss"], reference["loss"][1:]):
        assert _rel(got, want) <= 1e-5, (resumed["loss"], reference["loss"])
    for got, want in zip(resumed["grad_norm"], reference["grad_norm"][1:]):
        assert _rel(got, want) <= 1e-5
    assert (
        resumed["task_samples"] == reference["task_samples"]
    )  # samples per task restored and continued
    assert sum(reference["task_samples"].values()) > 3 * 8  # packed: more samples than sequences


def test_weights_only_checkpoint_needs_load_optimizer_false(initial_weights):
    from megamft.testing.distributed import DistributedTestError

    with pytest.raises(
        DistributedTestError, match="holds weights only .* set checkpoint.load_optimizer=false"
    ):
        launch(
            jobs.train,
            1,
            timeout=120,
            kwargs={
                "overrides": (
                    "train.train_steps=2",
                    f"checkpoint.load_dir={initial_weights}",
                    "checkpoint.resume=never",
                )
            },
        )


def test_non_finite_steps_are_skipped_then_stop_the_run(initial_weights):
    from megamft.testing.distributed import DistributedTestError

    with pytest.raises(
        DistributedTestError, match=r"steps in a row had a non-finite loss or gradient"
    ):
        launch(
            jobs.train,
            1,
            timeout=180,
            kwargs={
                "overrides": (
                    "train.train_steps=30",
                    "train.max_skipped_steps=1",
                    "optimizer.lr=1e30",
                    "optimizer.clip_grad=0",
                    "train.lr_warmup_steps=0",
                    f"checkpoint.load_dir={initial_weights}",
                    "checkpoint.load_optimizer=false",
                )
            },
        )


def test_resume_with_dropout_is_exact_because_rng_state_is_restored(initial_weights, tmp_path):
    common = (
        "train.train_steps=4",
        "transformer.hidden_dropout=0.2",
        "transformer.attention_dropout=0.1",
        "parallel.tensor_model_parallel_size=2",
    )
    reference = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={
            "overrides": common
            + (
                f"checkpoint.load_dir={initial_weights}",
                "checkpoint.load_optimizer=false",
                f"checkpoint.save_dir={tmp_path}",
                "checkpoint.save_interval=1",
            )
        },
    )[0]
    resumed = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={
            "overrides": common
            + (
                f"checkpoint.load_dir={tmp_path}",
                "checkpoint.load_iteration=2",
                "checkpoint.resume=never",
            )
        },
    )[0]
    for got, want in zip(resumed["loss"], reference["loss"][2:]):
        assert abs(got - want) <= 1e-6 * abs(want), (resumed["loss"], reference["loss"])


def _saved_weights(checkpoint: Path, scratch: Path) -> dict:
    """The model tensors of a dist checkpoint, read by torch's own DCP reader."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    state = torch.load(flat, weights_only=False)
    return {
        k: v
        for k, v in state.items()
        if torch.is_tensor(v) and k.startswith(("embedding.", "decoder.", "output"))
    }


OVERLAPPED = {  # name: (world size, layout); both overlap the gradient reduce and the parameter gather
    "dp2": (2, ()),
    "pp2-dp2-async-saves": (
        4,
        ("parallel.pipeline_model_parallel_size=2", "checkpoint.async_save=true"),
    ),
}


def _overlapped_run(initial_weights, save_dir: Path, world_size: int, layout: tuple) -> list[dict]:
    overrides = layout + (
        "train.train_steps=3",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval=1",
    )
    if world_size > 1:
        overrides += ("ddp.overlap_grad_reduce=true", "ddp.overlap_param_gather=true")
    launch(jobs.train, world_size, kwargs={"overrides": overrides}, timeout=300)
    scratch = save_dir.with_name(save_dir.name + "-flat")
    scratch.mkdir()
    return [_saved_weights(iteration_dir(save_dir, step), scratch) for step in (1, 2, 3)]


@pytest.fixture(scope="module")
def single_process_saves(initial_weights, tmp_path_factory):
    return _overlapped_run(initial_weights, tmp_path_factory.mktemp("single_saves"), 1, ())


@pytest.mark.parametrize("layout", list(OVERLAPPED))
def test_overlapped_parameter_gather_saves_the_current_weights(
    layout, initial_weights, single_process_saves, tmp_path
):
    """With ddp.overlap_param_gather the other DP ranks' shards arrive in the next forward pass; a save
    right after a step must still hold that step's weights (the single-process run's, same step)."""
    import torch

    world_size, overrides = OVERLAPPED[layout]
    saved = _overlapped_run(initial_weights, tmp_path / layout, world_size, overrides)
    # Step 1 runs at learning rate 0 (one warm-up step): steps 2 and 3 are the ones that move the weights.
    for step in (2, 3):
        want, got, before = (
            single_process_saves[step - 1],
            saved[step - 1],
            single_process_saves[step - 2],
        )
        assert sorted(got) == sorted(want) == sorted(before) and len(want) >= 5
        # A stale shard would hold the step before's values: the step moved them by ~lr (1e-3) ...
        assert max(float((want[k] - before[k]).abs().max()) for k in want) > 1e-4
        for key in want:  # ... while another reduction order moves them by ~1e-7
            assert torch.allclose(got[key], want[key], rtol=0, atol=1e-5), (step, key)


@pytest.mark.parametrize("kind", ["te", "apex"])
def test_resume_with_the_fused_adam_of_transformer_engine_or_apex(kind, initial_weights, tmp_path):
    """megatron-core uses TE's (else apex's) fused Adam whenever it imports; a requeued run must resume
    with it. Stand-ins follow each library's contract (tests/optimizer_standins.py cites the sources)."""
    import precision_jobs

    def train(*overrides):
        return launch(
            precision_jobs.train_with_fused_adam,
            2,
            timeout=300,
            kwargs={
                "kind": kind,
                "overrides": ("train.train_steps=3", "checkpoint.save_interval=1", *overrides),
            },
        )[0]

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    reference = train(
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={run}",
    )
    got = train(
        f"checkpoint.load_dir={run}",
        "checkpoint.load_iteration=1",
        "checkpoint.resume=never",
        f"checkpoint.save_dir={resumed}",
    )
    assert len(got["loss"]) == 2  # steps 2 and 3
    for key in ("loss", "grad_norm"):
        for value, want in zip(got[key], reference[key][1:]):
            assert _rel(value, want) <= 1e-5, (key, got[key], reference[key])
    assert reference["loss"][2] != reference["loss"][1]  # it trained
