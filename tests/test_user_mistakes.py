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


# config values: every value checked by `megamft check` as by `megamft train`, before anything starts
def _indexed_data(tmp):
    from data_fixtures import CONVERSATIONS, as_line, run_preprocess

    run_preprocess(tmp, {"code": [as_line(c, "messages") for c in CONVERSATIONS * 12],
                         "text": [as_line(c, "chat_rounds") for c in CONVERSATIONS * 12]}, dedup=False)


def _empty_file(tmp):
    (tmp / "run.yaml").write_text("# filled in later\n")


CHECK = ["megamft", "check", "--world-size", "1"]
INDEXED = ["data.source=indexed", "data.path={tmp}/out"]
CASES += [
    Mistake("negative learning rate", [*CHECK, "optimizer.lr=-1e-4"],
            message=r"optimizer\.lr must be >= 0, got -0\.0001"),
    Mistake("min_lr above lr", [*CHECK, "optimizer.min_lr=1e-2", "optimizer.lr=1e-3"],
            message=r"optimizer\.min_lr \(0\.01\) must not exceed optimizer\.lr \(0\.001\)"),
    Mistake("dropout above 1", [*CHECK, "transformer.hidden_dropout=1.5"],
            message=r"transformer\.hidden_dropout must be in \[0, 1\], got 1\.5"),
    Mistake("full recompute without its method", [*CHECK, "transformer.recompute_granularity=full"],
            message=r"recompute_granularity=full needs transformer\.recompute_method \(uniform or block\)"),
    Mistake("negative seed", [*CHECK, "train.seed=-1"], message=r"train\.seed must be in \[0, 4294967295\], got -1"),
    Mistake("a string where a list goes", [*CHECK, "lora.targets=linear_qkv"],
            message=r"'lora\.targets' must be a list, got 'linear_qkv': write \[a, b\] in YAML .*lora\.targets=\[a\]"),
    Mistake("every sampling weight zero", [*CHECK, "data.task_sampling=weights", "data.task_sampling_weights={a: 0}"],
            message=r"data\.task_sampling_weights gives every task weight 0"),
    Mistake("override without a value", [*CHECK, "data.path="], message=r"override 'data\.path=' has no value"),
    Mistake("empty save folder", [*CHECK, 'checkpoint.save_dir=""'],
            message=r"'checkpoint\.save_dir' is an empty path"),
    Mistake("empty --config", [*CHECK, "--config", ""], message=r"--config was given an empty path"),
    Mistake("empty config file", [*CHECK, "--config", "{tmp}/run.yaml"], setup=_empty_file,
            message=r"config file .*run\.yaml is empty"),
    Mistake("loss weight for a task the data lacks", [*CHECK, *INDEXED, "loss.task_weights={cod: 2}"],
            setup=_indexed_data, keep=("out",),
            message=r"loss\.task_weights names unknown task\(s\) \['cod'\]; the data's tasks are \['code', 'text'\]"),
    Mistake("every loss weight zero", [*CHECK, *INDEXED, "loss.task_weights={code: 0, text: 0}"],
            setup=_indexed_data, keep=("out",),
            message=r"loss\.task_weights gives every task weight 0: nothing would be learned"),
]


@pytest.mark.parametrize("mistake", CASES, ids=[case.name for case in CASES])
def test_a_mistake_gets_one_clear_line(mistake, tmp_path):
    run(mistake, tmp_path)

