"""parallel.distributed_timeout_minutes is how long any collective waits for a missing rank."""

import jobs
import pytest

from megamft.config import ConfigError, validate
from megamft.testing.distributed import launch


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_must_be_positive(value):
    with pytest.raises(
        ConfigError, match=rf"parallel.distributed_timeout_minutes must be > 0, got {value}"
    ):
        validate(jobs.tiny_config(f"parallel.distributed_timeout_minutes={value}"), 1)


@pytest.mark.slow
def test_every_group_times_out_after_the_configured_minutes():
    """The world group, megatron's groups (here DP) and megamft's host group all give up after 1.8 s when
    the other rank never joins (torch's and megatron's defaults: 10 and 30 minutes)."""
    waited = launch(jobs.collective_timeouts, 2, kwargs={"minutes": 0.03}, timeout=90)[0]
    assert sorted(waited) == ["data_parallel", "host", "world"]
    for group, (seconds, error) in waited.items():
        assert "Timed out" in error, (group, error)
        assert 1.7 <= seconds < 10, (group, seconds)
