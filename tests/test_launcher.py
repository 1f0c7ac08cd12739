"""The test launcher: real processes, tracebacks from failing ranks, no hangs."""

import os
import time

import pytest
import torch

from megamft.testing.distributed import DistributedTestError, launch


def _all_reduce_rank():
    torch.distributed.init_process_group(
        "gloo"
    )  # stands for NCCL: the tensor lives on the (emulated) GPU
    value = torch.tensor([float(torch.distributed.get_rank() + 1)], device="cuda")
    torch.distributed.all_reduce(value)
    torch.distributed.destroy_process_group()
    return {"rank": int(os.environ["RANK"]), "sum": value.item(), "pid": os.getpid()}


def _rank_one_fails():
    if os.environ["RANK"] == "1":
        raise ValueError("rank one cannot continue")
    time.sleep(60)


def _hangs():
    time.sleep(600)


def test_ranks_are_separate_processes_that_communicate():
    results = launch(_all_reduce_rank, world_size=4, timeout=120)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert all(r["sum"] == 10.0 for r in results)
    assert len({r["pid"] for r in results}) == 4


def test_failing_rank_reports_its_traceback_and_stops_the_others():
    started = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        launch(_rank_one_fails, world_size=2, timeout=120)
    assert "rank 1 of 2 failed" in str(err.value)
    assert "ValueError: rank one cannot continue" in str(err.value)
    assert time.monotonic() - started < 50  # rank 0's 60 s sleep was cut short


def test_timeout_kills_the_launch():
    started = time.monotonic()
    with pytest.raises(DistributedTestError, match="timed out after 5s"):
        launch(_hangs, world_size=2, timeout=5)
    assert time.monotonic() - started < 30
