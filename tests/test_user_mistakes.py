"""Every mistake a user can make gets one clear line and loses nothing (see tests/mistakes.py).

Add a case by appending a Mistake to CASES; a case needing files builds them in `setup`.
"""

import pytest

from mistakes import Mistake, run

CASES = [
    Mistake("unknown config key", ["megamft", "check", "--world-size", "1", "train.stpes=3"],
            message=r"unknown key 'train\.stpes'"),
    Mistake("config file that does not exist", ["megamft", "check", "--world-size", "1", "--config", "{tmp}/no.yaml"],
            message=r"config file .*no\.yaml does not exist"),
]


@pytest.mark.parametrize("mistake", CASES, ids=[case.name for case in CASES])
def test_a_mistake_gets_one_clear_line(mistake, tmp_path):
    run(mistake, tmp_path)
