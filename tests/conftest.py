import pytest

from megamft.testing.distributed import launch

import jobs


@pytest.fixture(scope="session")
def initial_weights(tmp_path_factory) -> str:
    """One untrained set of weights (TP=PP=DP=1) that every layout loads."""
    path = str(tmp_path_factory.mktemp("initial_weights"))
    launch(jobs.save_initial_weights, world_size=1, kwargs={"save_dir": path})
    return path
