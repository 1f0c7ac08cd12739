"""Every shipped config validates for the world size it is written for, without running."""

import re
from pathlib import Path

import pytest

from megamft.config import load_config, validate
from megamft.training.memory_estimate import estimate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.rglob("*.yaml"))


def _world_size(path: Path) -> int:
    text = path.read_text()
    found = re.search(r"--world-size (\d+)", text) or re.search(r"--nproc-per-node (\d+)", text)
    assert found, f"{path} must state its world size in its header"
    return int(found.group(1))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_validates(path):
    validate(load_config(path), _world_size(path))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "Expected memory" in p.read_text()],
                         ids=lambda p: p.name)
def test_stated_memory_is_the_estimate(path):
    cfg = load_config(path)
    stated = float(re.search(r"= ([\d.]+) GB", path.read_text()).group(1))
    computed = estimate(cfg, _world_size(path), cfg.model.vocab_size).total / 2**30
    assert abs(stated - computed) < 0.1, (stated, computed)
    assert computed < 80  # fits an H100's 80 GB
