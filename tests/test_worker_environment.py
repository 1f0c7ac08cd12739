"""What megamft's worker start-up sets in its own environment: CUDA_DEVICE_MAX_CONNECTIONS=1 where the
layout overlaps tensor/context-parallel communication with computation (megatron-core's
tensor_parallel/layers.py relies on it; Megatron-LM's validate_args requires it for TP > 1 or CP > 1)."""

import platform_jobs
import pytest

from megamft.testing.distributed import launch


@pytest.fixture(autouse=True)
def started_without_it(monkeypatch):
    monkeypatch.delenv(
        "CUDA_DEVICE_MAX_CONNECTIONS", raising=False
    )  # the ranks inherit this environment


def test_tensor_parallel_workers_set_one_device_connection_and_keep_a_users_value_with_a_warning():
    # rank 0 starts with a value the user exported; rank 1 with none
    results = launch(
        platform_jobs.device_connections_after_start,
        world_size=2,
        timeout=120,
        kwargs={"overrides": ["parallel.tensor_model_parallel_size=2"], "preset": {0: "8"}},
    )
    (value0, warnings0), (value1, warnings1) = results
    assert value1 == "1" and warnings1 == []
    assert value0 == "8"
    assert len(warnings0) == 1 and "CUDA_DEVICE_MAX_CONNECTIONS=8" in warnings0[0]


def test_data_parallel_workers_leave_it_unset():
    results = launch(
        platform_jobs.device_connections_after_start,
        world_size=2,
        timeout=120,
        kwargs={"overrides": [], "preset": {}},
    )
    assert results == [(None, []), (None, [])]
