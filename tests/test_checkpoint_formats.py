"""The default checkpoint format: DP-sharded optimizer state, written and read in parallel over DP.

A DP=2 run saving asynchronously after every step in checkpoint.optimizer_format's default (dp_sharded),
with several gradient buckets, is the reference. As torch's own DCP reader sees its checkpoints, they hold
megatron's dp_reshardable buckets, and the weights both ranks hold are written by one rank or the other
(megatron's fully parallel save). Resuming from its step-1 checkpoint reproduces the steps after at DP=2
(bit for bit) and at DP=1; another model-parallel layout is refused with one error naming the difference
and the way out, and that way out (one resave as reshardable) then resumes at TP=2.
"""

import jobs
import pytest
from torch.distributed.checkpoint import FileSystemReader

from megamft.checkpoint.layout import iteration_dir
from megamft.testing.distributed import DistributedTestError, launch

STEPS = 3
BUCKETS = (
    "ddp.overlap_grad_reduce=true",
    "ddp.bucket_size=6000",
)  # the test model's buffer in several buckets


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _resume(save_dir, world_size: int, *overrides: str, iteration: int = 1) -> dict:
    return launch(
        jobs.train,
        world_size,
        timeout=240,
        kwargs={
            "overrides": BUCKETS
            + overrides
            + (
                f"train.train_steps={STEPS}",
                f"checkpoint.load_dir={save_dir}",
                f"checkpoint.load_iteration={iteration}",
                "checkpoint.resume=never",
            )
        },
    )[0]


@pytest.fixture(scope="module")
def sharded_run(initial_weights, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("dp2_run")
    overrides = BUCKETS + (
        f"train.train_steps={STEPS}",
        f"checkpoint.load_dir={initial_weights}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval=1",
        "checkpoint.async_save=true",
    )
    return save_dir, launch(jobs.train, 2, kwargs={"overrides": overrides}, timeout=240)[0]


def _writers(checkpoint) -> dict[tuple[str, tuple], int]:
    """(global key, chunk offsets) -> the rank that wrote that chunk (torch's FileSystemWriter names each
    rank's files __<rank>_<n>.distcp)."""
    return {
        (index.fqn, tuple(index.offset or ())): int(info.relative_path.split("_")[2])
        for index, info in FileSystemReader(str(checkpoint)).read_metadata().storage_data.items()
    }


def test_each_rank_writes_its_optimizer_shard_and_half_the_weights(sharded_run):
    save_dir, _ = sharded_run
    writers = _writers(iteration_dir(save_dir, STEPS))
    optimizer = [key for key, _ in writers if key.startswith("optimizer.")]
    assert optimizer and all(key.startswith("optimizer.distributed.") for key in optimizer), (
        optimizer[:3]
    )
    buckets = {chunk: rank for chunk, rank in writers.items() if ".bucket_idx_" in chunk[0]}
    assert (
        len({key.split(".bucket_idx_")[1].split(".")[0] for key, _ in buckets}) >= 3
    )  # several buckets
    assert set(buckets.values()) == {0, 1}
    weights = [
        rank
        for (key, _), rank in writers.items()
        if key.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in key
    ]
    assert len(weights) >= 10
    # Both ranks hold every weight; megatron's fully parallel save spreads their writing over the DP group
    # (without it, DP rank 0 writes them all).
    assert min(weights.count(0), weights.count(1)) >= len(weights) // 4, (
        weights.count(0),
        weights.count(1),
    )


@pytest.mark.parametrize("world_size", [2, 1])
def test_dp_sharded_checkpoint_resumes_the_run_at_any_dp(sharded_run, world_size):
    save_dir, reference = sharded_run
    resumed = _resume(save_dir, world_size)
    assert len(resumed["loss"]) == STEPS - 1  # steps 2 and 3 only
    got = resumed["loss"] + resumed["grad_norm"]
    want = reference["loss"][1:] + reference["grad_norm"][1:]
    if world_size == 2:  # the same layout: the same arithmetic
        assert got == want
    else:  # another DP size reduces gradients in another order
        assert all(_rel(g, w) <= 1e-5 for g, w in zip(got, want)), (got, want)


@pytest.mark.parametrize(
    "change,named",
    [
        (
            "parallel.tensor_model_parallel_size=2",
            "parallel.tensor_model_parallel_size: checkpoint 1, this run 2",
        ),
        ("ddp.bucket_size=9000", "ddp.bucket_size: checkpoint 6000, this run 9000"),
    ],
)
def test_another_model_parallel_layout_is_refused_naming_the_difference(sharded_run, change, named):
    save_dir, _ = sharded_run
    with pytest.raises(DistributedTestError, match=r"holds DP-sharded optimizer state") as refused:
        _resume(save_dir, 2, change)
    message = str(refused.value)
    assert named in message and "checkpoint.optimizer_format=reshardable" in message, message


@pytest.mark.slow
def test_resaved_as_reshardable_it_resumes_at_another_tp(sharded_run, tmp_path):
    """The way out the refusal names: resume at the saving layout with optimizer_format=reshardable, save,
    then resume that checkpoint at TP=2."""
    save_dir, reference = sharded_run
    resaved = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={
            "overrides": BUCKETS
            + (
                "train.train_steps=2",
                f"checkpoint.load_dir={save_dir}",
                "checkpoint.load_iteration=1",
                "checkpoint.resume=never",
                f"checkpoint.save_dir={tmp_path}",
                "checkpoint.optimizer_format=reshardable",
            )
        },
    )[0]
    assert resaved["loss"] == reference["loss"][1:2]
    assert any(
        key.startswith("optimizer.state.") for key, _ in _writers(iteration_dir(tmp_path, 2))
    )
    resumed = _resume(tmp_path, 2, "parallel.tensor_model_parallel_size=2", iteration=2)
    for got, want in zip(
        resumed["loss"] + resumed["grad_norm"], reference["loss"][2:] + reference["grad_norm"][2:]
    ):
        assert _rel(got, want) <= 1e-5, (resumed["loss"], reference["loss"])


MOE = (
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "parallel.expert_model_parallel_size=2",
)


@pytest.mark.slow
def test_moe_checkpoint_of_two_chained_optimizers_resumes_exactly(tmp_path):
    """With experts the distributed optimizer is two (dense and expert parameters); megatron prefixes each
    one's keys with chained_<i>., which a check for optimizer state has to recognize."""
    launch(
        jobs.save_initial_weights,
        1,
        timeout=120,
        kwargs={"save_dir": str(tmp_path / "init"), "overrides": MOE[:4]},
    )
    common = MOE + (f"train.train_steps={STEPS}",)
    reference = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={
            "overrides": common
            + (
                f"checkpoint.load_dir={tmp_path / 'init'}",
                "checkpoint.load_optimizer=false",
                f"checkpoint.save_dir={tmp_path / 'run'}",
                "checkpoint.save_interval=1",
            )
        },
    )[0]
    assert any(
        key.startswith("chained_1.optimizer.distributed.")
        for key, _ in _writers(iteration_dir(tmp_path / "run", 1))
    )
    resumed = launch(
        jobs.train,
        2,
        timeout=240,
        kwargs={
            "overrides": common
            + (
                f"checkpoint.load_dir={tmp_path / 'run'}",
                "checkpoint.load_iteration=1",
                "checkpoint.resume=never",
            )
        },
    )[0]
    assert (
        resumed["loss"] + resumed["grad_norm"] == reference["loss"][1:] + reference["grad_norm"][1:]
    )
