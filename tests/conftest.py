import jobs
import pytest
import training_runs
from data_fixtures import make_hf_tokenizer, make_sentencepiece

from megamft.testing.distributed import launch


@pytest.fixture(scope="session")
def initial_weights(tmp_path_factory) -> str:
    """One untrained set of weights (TP=PP=DP=1) that every layout loads."""
    path = str(tmp_path_factory.mktemp("initial_weights"))
    launch(jobs.save_initial_weights, world_size=1, kwargs={"save_dir": path})
    return path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    """The loss of every step of a run of training_runs' settings that nothing interrupts."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ranks = training_runs.start_ranks(tmp, "run", f"checkpoint.save_dir={tmp / 'ckpt'}")
    assert training_runs.wait_all(ranks) == [0, 0]
    losses = training_runs.losses([tmp / "run" / "tb"])
    assert sorted(losses) == list(range(1, training_runs.STEPS + 1))
    return losses


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """The preprocessing tests' tokenizers by kind: byte, sentencepiece (Llama style), huggingface (Qwen style)."""
    folder = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte": "byte",
        "sentencepiece": str(make_sentencepiece(folder)),
        "huggingface": str(make_hf_tokenizer(folder / "hf")),
    }
