"""Every mistake a user can make gets one clear line and loses nothing (see tests/mistakes.py).

Add a case by appending a Mistake to CASES; a case needing files builds them in `setup`.
"""

import re

import damaged_inputs as damaged
import pytest
from damaged_inputs import TINY_MODEL
from identity_fixtures import (
    EXPORT,
    converted_with_template,
    other_size,
    tokenizer_past_the_vocabulary,
)
from mistakes import Mistake, run

CASES = [
    Mistake(
        "unknown config key",
        ["megamft", "check", "--world-size", "1", "train.stpes=3"],
        message=r"unknown key 'train\.stpes'",
    ),
    Mistake(
        "config file that does not exist",
        ["megamft", "check", "--world-size", "1", "--config", "{tmp}/no.yaml"],
        message=r"config file .*no\.yaml does not exist",
    ),
    # content identity
    Mistake(
        "export with the template of another model size",
        EXPORT,
        message=r"megamft-convert: --hf-template .*/other does not fit the checkpoint's model: config\.json has "
        r"hidden_size=64, the model 32; config\.json has intermediate_size=128, the model 64\. Give the",
        setup=lambda tmp: converted_with_template(tmp, other_size),
        keep=("ckpt", "other"),
    ),
    Mistake(
        "export with a template whose tokenizer has ids past the model's vocabulary",
        EXPORT,
        message=r"--hf-template .*/other does not fit the checkpoint's model: tokenizer\.json has ids up to "
        r"70000, the model's vocabulary \d+ rows",
        setup=lambda tmp: converted_with_template(tmp, tokenizer_past_the_vocabulary),
        keep=("ckpt", "other"),
    ),
]


# config values: every value checked by `megamft check` as by `megamft train`, before anything starts
def _indexed_data(tmp):
    from data_fixtures import CONVERSATIONS, as_line, run_preprocess

    run_preprocess(
        tmp,
        {
            "code": [as_line(c, "messages") for c in CONVERSATIONS * 12],
            "text": [as_line(c, "chat_rounds") for c in CONVERSATIONS * 12],
        },
        dedup=False,
    )


def _empty_file(tmp):
    (tmp / "run.yaml").write_text("# filled in later\n")


CHECK = ["megamft", "check", "--world-size", "1"]
INDEXED = ["data.source=indexed", "data.path={tmp}/out"]
CASES += [
    Mistake(
        "negative learning rate",
        [*CHECK, "optimizer.lr=-1e-4"],
        message=r"optimizer\.lr must be >= 0, got -0\.0001",
    ),
    Mistake(
        "min_lr above lr",
        [*CHECK, "optimizer.min_lr=1e-2", "optimizer.lr=1e-3"],
        message=r"optimizer\.min_lr \(0\.01\) must not exceed optimizer\.lr \(0\.001\)",
    ),
    Mistake(
        "dropout above 1",
        [*CHECK, "transformer.hidden_dropout=1.5"],
        message=r"transformer\.hidden_dropout must be in \[0, 1\], got 1\.5",
    ),
    Mistake(
        "full recompute without its method",
        [*CHECK, "transformer.recompute_granularity=full"],
        message=r"recompute_granularity=full needs transformer\.recompute_method \(uniform or block\)",
    ),
    Mistake(
        "negative seed",
        [*CHECK, "train.seed=-1"],
        message=r"train\.seed must be in \[0, 4294967295\], got -1",
    ),
    Mistake(
        "a string where a list goes",
        [*CHECK, "lora.targets=linear_qkv"],
        message=r"'lora\.targets' must be a list, got 'linear_qkv': write \[a, b\] in YAML .*lora\.targets=\[a\]",
    ),
    Mistake(
        "every sampling weight zero",
        [*CHECK, "data.task_sampling=weights", "data.task_sampling_weights={a: 0}"],
        message=r"data\.task_sampling_weights gives every task weight 0",
    ),
    Mistake(
        "override without a value",
        [*CHECK, "data.path="],
        message=r"override 'data\.path=' has no value",
    ),
    Mistake(
        "empty save folder",
        [*CHECK, 'checkpoint.save_dir=""'],
        message=r"'checkpoint\.save_dir' is an empty path",
    ),
    Mistake(
        "empty --config", [*CHECK, "--config", ""], message=r"--config was given an empty path"
    ),
    Mistake(
        "empty config file",
        [*CHECK, "--config", "{tmp}/run.yaml"],
        setup=_empty_file,
        message=r"config file .*run\.yaml is empty",
    ),
    Mistake(
        "loss weight for a task the data lacks",
        [*CHECK, *INDEXED, "loss.task_weights={cod: 2}"],
        setup=_indexed_data,
        keep=("out",),
        message=r"loss\.task_weights names unknown task\(s\) \['cod'\]; the data's tasks are \['code', 'text'\]",
    ),
    Mistake(
        "every loss weight zero",
        [*CHECK, *INDEXED, "loss.task_weights={code: 0, text: 0}"],
        setup=_indexed_data,
        keep=("out",),
        message=r"loss\.task_weights gives every task weight 0: nothing would be learned",
    ),
]

# --- no traceback: missing inputs, files that are not what they claim, disks, ports, command lines ---------
QUIET = {
    "MEGAMFT_LOG_LEVEL": "WARNING"
}  # training's progress log: the error is then the one line on stderr
CASES += [
    Mistake(
        "a command misspelled", ["megamft", "trian"], message=r"^megamft: .*invalid choice: 'trian'"
    ),
    Mistake(
        "eval: a model folder that does not exist",
        ["megamft", "eval", "humaneval", "{tmp}/no-model", "--output", "{tmp}/eval"],
        message=r"^megamft: model '.*no-model' not found",
    ),
    Mistake(
        "eval: a problems file that does not exist",
        [
            "megamft",
            "eval",
            "humaneval",
            "{tmp}/model",
            "--problems",
            "{tmp}/no.jsonl",
            "--output",
            "{tmp}/eval",
        ],
        message=r"--problems .*no\.jsonl: no such file",
        setup=damaged.fake_hf_model,
    ),
    Mistake(
        "eval: a tokenizer.json of random bytes",
        [
            "megamft",
            "eval",
            "humaneval",
            "{tmp}/model",
            "--tokenizer",
            "{tmp}/tok/tokenizer.json",
            "--limit",
            "1",
            "--k",
            "1",
            "--output",
            "{tmp}/eval",
        ],
        message=r"tok/tokenizer\.json: not a Hugging Face tokenizer\.json",
        setup=damaged.tokenizer_json_binary,
        keep=("tok",),
    ),
    Mistake(
        "eval: --output on a read-only file system",
        [
            "megamft",
            "eval",
            "humaneval",
            "{tmp}/model",
            "--limit",
            "1",
            "--k",
            "1",
            "--output",
            "{tmp}/ro/eval",
        ],
        message=r"ro/eval: read-only file system",
        setup=damaged.fake_hf_model,
        read_only=("ro",),
    ),
    Mistake(
        "preprocess: an input file that does not exist",
        ["megamft-preprocess", "--task", "t={tmp}/no.jsonl", "--out", "{tmp}/out", "--quiet"],
        message=r"input .*no\.jsonl does not exist",
    ),
    Mistake(
        "preprocess: a tokenizer.json that is not JSON",
        [
            "megamft-preprocess",
            "--task",
            "t={tmp}/data.jsonl",
            "--tokenizer",
            "{tmp}/tok/tokenizer.json",
            "--out",
            "{tmp}/out",
            "--quiet",
        ],
        message=r"tok/tokenizer\.json: not a Hugging Face tokenizer\.json",
        setup=damaged.tokenizer_json_not_json,
        keep=("tok", "data.jsonl"),
    ),
    Mistake(
        "preprocess: a corrupt sentencepiece model",
        [
            "megamft-preprocess",
            "--task",
            "t={tmp}/data.jsonl",
            "--tokenizer",
            "{tmp}/tokenizer.model",
            "--workers",
            "2",
            "--out",
            "{tmp}/out",
            "--quiet",
        ],
        message=r"tokenizer\.model: not a readable sentencepiece model",
        setup=damaged.corrupt_sentencepiece,
        keep=("tokenizer.model", "data.jsonl"),
    ),
    Mistake(
        "preprocess: --out on a full disk",
        [
            "megamft-preprocess",
            "--task",
            "t={tmp}/data.jsonl",
            "--out",
            "{tmp}/full/out",
            "--quiet",
        ],
        message=r"full/out .*No space left on device",
        setup=damaged.conversations,
        full=("full",),
        keep=("data.jsonl",),
    ),
    Mistake(
        "convert: a truncated safetensors file",
        ["megamft-convert", "hf-to-megatron", "--hf", "{tmp}/hf", "--out", "{tmp}/out"],
        message=r"hf/model\.safetensors: not a readable safetensors file .*download it again",
        setup=damaged.truncated_safetensors,
        keep=("hf",),
    ),
    Mistake(
        "convert: --out on a read-only file system",
        ["megamft-convert", "hf-to-megatron", "--hf", "{tmp}/hf", "--out", "{tmp}/ro/out"],
        message=r"ro/out\.partial: read-only file system",
        setup=damaged.tiny_hf_model,
        read_only=("ro",),
        keep=("hf",),
    ),
    Mistake(
        "convert: --out on a full disk",
        ["megamft-convert", "hf-to-megatron", "--hf", "{tmp}/hf", "--out", "{tmp}/full/out"],
        message=r"full/out\.partial/.*: no space left on the device",
        setup=damaged.tiny_hf_model,
        full=("full",),
        keep=("hf",),
    ),
    Mistake(
        "export: a checkpoint folder that does not exist",
        [
            "megamft-convert",
            "megatron-to-hf",
            "--checkpoint",
            "{tmp}/no-ckpt",
            "--out",
            "{tmp}/out",
        ],
        message=r"no-ckpt: neither a checkpoint nor a folder with a 'latest' checkpoint",
    ),
    Mistake(
        "export: an --hf-template that does not exist",
        [
            "megamft-convert",
            "megatron-to-hf",
            "--checkpoint",
            "{tmp}/ckpt",
            "--hf-template",
            "{tmp}/no-hf",
            "--out",
            "{tmp}/out",
        ],
        message=r"--hf-template .*no-hf is not a folder",
        setup=damaged.tiny_checkpoint,
        keep=("ckpt",),
    ),
    Mistake(
        "export: --out on a full disk",
        [
            "megamft-convert",
            "megatron-to-hf",
            "--checkpoint",
            "{tmp}/ckpt",
            "--out",
            "{tmp}/full/hf",
        ],
        message=r"full/hf\.partial/.*safetensors: no space left on the device",
        setup=damaged.tiny_checkpoint,
        full=("full",),
        keep=("ckpt",),
    ),
    Mistake(
        "train: MASTER_PORT taken by another process",
        ["megamft", "train", *TINY_MODEL],
        message=r"^megamft: MASTER_PORT=\d+ is in use by another process",
        env={"MASTER_PORT": "{port}"},
        busy_port=True,
    ),
    Mistake(
        "train: a corrupt sentencepiece model as data.tokenizer",
        ["megamft", "train", *TINY_MODEL, "data.tokenizer={tmp}/tokenizer.model"],
        message=r"^megamft: .*tokenizer\.model: not a readable sentencepiece model",
        setup=damaged.corrupt_sentencepiece,
        env=QUIET,
        keep=("tokenizer.model",),
    ),
    Mistake(
        "train: checkpoint.save_dir on a read-only file system",
        ["megamft", "train", *TINY_MODEL, "checkpoint.save_dir={tmp}/ro/run"],
        message=r"checkpoint\.save_dir .*ro/run cannot be written \(Read-only file system\)",
        read_only=("ro",),
        env=QUIET,
    ),
    Mistake(
        "launch: an option torchrun does not know",
        ["megamft", "launch", "--nproc-per-node", "2", "--bogus", "-m", "megamft", "train"],
        message=r"^megamft launch: unrecognized arguments: --bogus",
    ),
    Mistake(
        "launch: a --master-port another process listens on",
        [
            "megamft",
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "{port}",
            "-m",
            "megamft",
            "train",
        ],
        message=r"^megamft launch: port \d+ is in use",
        busy_port=True,
        env={"OMP_NUM_THREADS": "1"},
    ),
]
SEVERAL_RANKS = [  # the workers say it once; then megamft launch names the rank that failed first
    (
        Mistake(
            "launch: a config error every rank finds",
            [
                "megamft",
                "launch",
                "--nproc-per-node",
                "2",
                "-m",
                "megamft",
                "train",
                "train.stpes=3",
            ],
            message=r"^megamft: invalid config: unknown key 'train\.stpes'",
            lines=2,
            env={"OMP_NUM_THREADS": "1"},
        ),
        r"megamft launch: rank 0 stopped on a mistake in the input \(exit code 2\).*",
    ),
    (
        Mistake(
            "launch: data damaged on rank 1 only",
            [
                "megamft",
                "launch",
                "--nproc-per-node",
                "2",
                "--no-python",
                "sh",
                "{tmp}/rank.sh",
                *TINY_MODEL,
            ],
            message=r"^megamft: rank 1: .*data-rank1/.*\.bin: \d+ bytes, but its index .* needs \d+: truncated",
            lines=2,
            setup=damaged.data_damaged_on_rank_1,
            env={"OMP_NUM_THREADS": "1", **QUIET},
            keep=("data",),
        ),
        r"megamft launch: rank 1 stopped on a mistake in the input \(exit code 2\).*",
    ),
]


@pytest.mark.parametrize("mistake", CASES, ids=[case.name for case in CASES])
def test_a_mistake_gets_one_clear_line(mistake, tmp_path):
    run(mistake, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake, launch_line", SEVERAL_RANKS, ids=[case.name for case, _ in SEVERAL_RANKS]
)
def test_several_ranks_say_a_mistake_once_and_launch_names_the_rank(mistake, launch_line, tmp_path):
    done = run(mistake, tmp_path)
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(launch_line, last), last
    assert done.returncode == 2  # the failing worker's status, not torchrun's 1
