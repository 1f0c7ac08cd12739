"""Every mistake a user can make gets one clear line and loses nothing (see tests/mistakes.py).

Add a case by appending a Mistake to CASES; a case needing files builds them in `setup`.
"""

import pytest

from identity_fixtures import EXPORT, converted_with_template, other_size, tokenizer_past_the_vocabulary
from mistakes import Mistake, run

CASES = [
    Mistake("unknown config key", ["megamft", "check", "--world-size", "1", "train.stpes=3"],
            message=r"unknown key 'train\.stpes'"),
    Mistake("config file that does not exist", ["megamft", "check", "--world-size", "1", "--config", "{tmp}/no.yaml"],
            message=r"config file .*no\.yaml does not exist"),
    # content identity
    Mistake("export with the template of another model size", EXPORT,
            message=r"megamft-convert: --hf-template .*/other does not fit the checkpoint's model: config\.json has "
                    r"hidden_size=64, the model 32; config\.json has intermediate_size=128, the model 64\. Give the",
            setup=lambda tmp: converted_with_template(tmp, other_size), keep=("ckpt", "other")),
    Mistake("export with a template whose tokenizer has ids past the model's vocabulary", EXPORT,
            message=r"--hf-template .*/other does not fit the checkpoint's model: tokenizer\.json has ids up to "
                    r"70000, the model's vocabulary \d+ rows",
            setup=lambda tmp: converted_with_template(tmp, tokenizer_past_the_vocabulary), keep=("ckpt", "other")),
]


@pytest.mark.parametrize("mistake", CASES, ids=[case.name for case in CASES])
def test_a_mistake_gets_one_clear_line(mistake, tmp_path):
    run(mistake, tmp_path)
