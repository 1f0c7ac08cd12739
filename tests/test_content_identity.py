"""Data, runs, evaluations and exports are identified by content, not by path.

Each test makes the user's mistake first (a data file edited or swapped after preprocessing, data
rebuilt in place under a run, an evaluation rerun on another model, an export given another
model's template) and checks that megamft names it; and that the same content under another path
is accepted.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from data_fixtures import run_preprocess

from megamft.config import load_config
from megamft.data.dataset import load_data
from megamft.data.manifest import CHECKSUMS, task_files
from megamft.platform.checksums import BlockDigest, file_record
from megamft.testing.forked_command import run_module

ROOT = Path(__file__).resolve().parents[1]


def _lines(letter: str, count: int = 40) -> list[str]:
    """Conversations whose lengths depend only on their index: tasks of other letters have files of equal size."""
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"q{i} " + letter * 5},
                    {"role": "assistant", "content": letter * (10 + i % 7)},
                ]
            }
        )
        for i in range(count)
    ]


def _preprocessed(tmp_path: Path, **lines) -> Path:
    out, _ = run_preprocess(tmp_path, lines or {"a": _lines("a"), "b": _lines("b")})
    return out


def _data_config(path: Path, *overrides: str):
    return load_config(
        [],
        [
            "data.source=indexed",
            f"data.path={path}",
            "data.valid_samples_per_task=2",
            "data.seq_length=128",
            *overrides,
        ],
    ).data


def _flip(path: Path, offset: int = -3) -> None:
    """Change one byte in place: same size, other content."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _check(path: Path, *overrides: str) -> str | None:
    """What training's check of the files finds (it waits for the background hashing)."""
    data = load_data(_data_config(path, *overrides), verify=True)
    return data.checksums.problem()


# ---- checksums recorded at preprocessing ----------------------------------------------------------------


def test_the_manifest_records_the_checksum_of_every_file_a_task_reads(tmp_path):
    out = _preprocessed(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    records = manifest[CHECKSUMS]
    names = [name for entry in manifest["tasks"] for name in task_files(entry)]
    assert sorted(records) == sorted(names) and len(names) == 12
    for name in names:  # the reference: hashlib over the bytes on disk, read here
        data = (out / name).read_bytes()
        size = records[name]["block_bytes"]
        blocks = [hashlib.sha256(data[i : i + size]).hexdigest() for i in range(0, len(data), size)]
        assert records[name]["bytes"] == len(data) and records[name]["blocks"] == blocks


def test_block_checksums_fed_in_any_pieces_equal_those_of_each_block(tmp_path):
    data = os.urandom(10_000)
    digest = BlockDigest(block_bytes=1024)
    cuts = [0, 1, 1023, 1024, 1025, 3000, 7777, 10_000]
    for start, end in zip(cuts, cuts[1:]):
        digest.update(data[start:end])
    expected = [hashlib.sha256(data[i : i + 1024]).hexdigest() for i in range(0, 10_000, 1024)]
    assert digest.record() == {"bytes": 10_000, "block_bytes": 1024, "blocks": expected}
    (tmp_path / "f").write_bytes(data)
    assert file_record(tmp_path / "f", 1024) == digest.record()
    assert BlockDigest(64).record() == {"bytes": 0, "block_bytes": 64, "blocks": []}


def test_a_check_names_the_block_of_a_changed_byte(tmp_path):
    from megamft.platform.checksums import BlockCheck, all_blocks

    path = tmp_path / "f"
    path.write_bytes(os.urandom(5000))
    record = file_record(path, 1024)
    assert BlockCheck(all_blocks(path, record), threads=3).start().wait() is None
    _flip(path, 2100)
    mismatch = BlockCheck(all_blocks(path, record), threads=3).start().wait()
    assert mismatch.path == path and "bytes 2048-3071 differ" in mismatch.problem


# ---- the files are checked before training ---------------------------------------------------------------


def test_a_bin_edited_in_place_is_named(tmp_path):
    out = _preprocessed(tmp_path)
    assert _check(out) is None
    _flip(out / "b.bin")  # same size, one token changed: the indexes and sizes still agree
    problem = _check(out)
    assert problem.startswith(f"{out / 'b.bin'}: bytes 0-") and "differ" in problem
    assert f"re-run megamft-preprocess --out {out}" in problem


def test_a_bin_swapped_with_another_tasks_is_named(tmp_path):
    out = _preprocessed(tmp_path)
    a, b = (out / "a.bin").read_bytes(), (out / "b.bin").read_bytes()
    assert len(a) == len(b) and a != b
    (out / "a.bin").write_bytes(b)
    (out / "b.bin").write_bytes(a)
    load_data(_data_config(out))  # sizes and indexes agree: only the content tells
    problem = _check(out)
    assert problem is not None and problem.startswith(f"{out / 'a.bin'}: ")


def test_the_sampled_check_finds_a_swapped_file(tmp_path):
    out = _preprocessed(tmp_path)
    shutil.copy(out / "a.bin", out / "b.bin")
    assert _check(out, "data.verify=sampled").startswith(f"{out / 'b.bin'}: ")


def test_the_sampled_check_reads_indexes_whole_and_a_sample_of_other_files(tmp_path):
    import random

    from megamft.data.verify import SAMPLE_EVERY, _sampled

    record = {"bytes": 1000 * 64, "block_bytes": 64, "blocks": ["0" * 64] * 1000}
    blocks = [b for _, _, b in _sampled(Path("x.bin"), record, random.Random(0))]
    assert blocks[0] == 0 and blocks[-1] == 999 and len(blocks) == 2 + -(-998 // SAMPLE_EVERY)
    assert len({b for _, _, b in _sampled(Path("x.idx"), record, random.Random(0))}) == 1000


def test_a_manifest_without_checksums_still_loads_unverified(tmp_path):
    out = _preprocessed(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest[CHECKSUMS]  # as megamft-preprocess wrote it before checksums were recorded
    (out / "manifest.json").write_text(json.dumps(manifest))
    _flip(out / "b.bin")
    data = load_data(_data_config(out), verify=True)
    assert data.checksums is None and len(data.task_names) == 2


# ---- a run's identity holds its data's content ----------------------------------------------------------


def _saved_run(save_dir: Path, data: Path, identity: bool = True):
    """A save folder whose latest checkpoint (iteration 1) trained on `data`, as dist_checkpoint.save leaves it
    (its megamft_data.json left out, as before identities were recorded, unless `identity`)."""
    from megamft.checkpoint.layout import LATEST, iteration_dir, write_atomically
    from megamft.config import to_dict
    from megamft.data.identity import data_identity

    cfg = load_config(
        [], ["data.source=indexed", f"data.path={data}", f"checkpoint.save_dir={save_dir}"]
    )
    folder = iteration_dir(save_dir, 1)
    folder.mkdir(parents=True)
    (folder / "megamft_config.json").write_text(json.dumps(to_dict(cfg)))
    if identity:
        manifest = json.loads((data / "manifest.json").read_text())
        (folder / "megamft_data.json").write_text(json.dumps(data_identity(manifest)))
    write_atomically(save_dir / LATEST, "1\n")


def _resume_check(save_dir: Path, data: Path, *overrides: str):
    from megamft.checkpoint.run_folder import check_save_folder

    return check_save_folder(
        load_config(
            [],
            [
                "data.source=indexed",
                f"data.path={data}",
                f"checkpoint.save_dir={save_dir}",
                *overrides,
            ],
        )
    )


def test_a_run_resumes_on_its_data_moved_and_refuses_it_rebuilt(tmp_path):
    from megamft.platform.output_folder import DestinationError

    data = _preprocessed(tmp_path / "first")
    _saved_run(tmp_path / "run", data)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert _resume_check(tmp_path / "run", moved) == 1
    assert (
        _resume_check(tmp_path / "run", moved, "data.verify=sampled") == 1
    )  # how it is checked is no difference
    rebuilt = _preprocessed(tmp_path / "rebuilt", a=_lines("a"), b=_lines("z"), c=_lines("c"))
    with pytest.raises(
        DestinationError,
        match=r"which differs in: data content \(task b: b\.bin changed\); "
        r"data content \(task c is new\)\. Resume",
    ):
        _resume_check(tmp_path / "run", rebuilt)
    assert _resume_check(tmp_path / "run", rebuilt, "checkpoint.allow_config_change=true") == 1


def test_a_checkpoint_without_data_identity_is_still_compared_by_path(tmp_path):
    from megamft.platform.output_folder import DestinationError

    data = _preprocessed(tmp_path / "first")
    _saved_run(tmp_path / "run", data, identity=False)
    assert _resume_check(tmp_path / "run", data) == 1
    shutil.copytree(data, tmp_path / "moved")
    with pytest.raises(DestinationError, match=r"differs in: data\.path: "):
        _resume_check(tmp_path / "run", tmp_path / "moved")


# ---- through `megamft train` -----------------------------------------------------------------------------

RUN = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "data.seq_length=128",
    "data.valid_samples_per_task=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.lr_warmup_steps=0",
    "train.log_interval=1",
    "data.source=indexed",
]


def _train(data: Path, save_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    return run_module(
        "megamft",
        ["train", *RUN, f"data.path={data}", f"checkpoint.save_dir={save_dir}", *overrides],
        env,
        ROOT,
        timeout=300,
    )


@pytest.mark.slow
def test_training_on_an_edited_file_stops_before_its_first_step(tmp_path):
    out = _preprocessed(tmp_path)
    _flip(out / "a_loss_mask.bin", 5)  # one token's learned/not-learned flag flipped
    done = _train(out, tmp_path / "run", "train.train_steps=1")
    assert done.returncode != 0
    assert (
        f"{out / 'a_loss_mask.bin'}: bytes 0-" in done.stderr
        and "megamft-preprocess --out" in done.stderr
    )
    assert "step 1/1" not in done.stderr and "valid (before)" not in done.stderr


@pytest.mark.slow
def test_every_rank_stops_with_the_error_the_checking_rank_found(tmp_path):
    """Only the first rank of a node hashes; the others must not start training without it."""
    from identity_fixtures import training_refusal

    from megamft.testing.distributed import launch

    out = _preprocessed(tmp_path)
    _flip(out / "b_task_id.bin", 0)
    overrides = (*RUN, f"data.path={out}", "train.train_steps=1", "data.valid_samples_per_task=4")
    messages = launch(training_refusal, 2, kwargs={"overrides": overrides}, timeout=300)
    assert messages[0] == messages[1] and messages[0].startswith(
        f"{out / 'b_task_id.bin'}: bytes 0-"
    )


@pytest.mark.slow
def test_resuming_follows_the_data_content_not_its_path(tmp_path):
    """The same data copied elsewhere resumes; data rebuilt in place is refused with the change listed."""
    first = _preprocessed(tmp_path / "first")
    run = tmp_path / "run"
    done = _train(first, run, "train.train_steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "iter_0000001" / "megamft_data.json").read_text())["tasks"]["a"]
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    done = _train(moved, run, "train.train_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run} at iteration 1" in done.stderr and "step 2/2" in done.stderr
    run_preprocess(
        tmp_path / "moved_inputs", {"a": _lines("a"), "b": _lines("z")}
    )  # b rebuilt from other lines
    shutil.rmtree(moved)
    shutil.copytree(tmp_path / "moved_inputs" / "out", moved)
    refused = _train(moved, run, "train.train_steps=3")
    assert refused.returncode != 0 and "holds another run's checkpoints" in refused.stderr
    assert (
        "data content (task b: b.bin changed)" in refused.stderr and "task a" not in refused.stderr
    )
    assert (run / "latest").read_text().strip() == "2"


# ---- exports: their source recorded, a template of another model refused ------------------------------------


def _tiny_llama(folder: Path, vocab: int, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def _simple_tokenizer(folder: Path, chat_template: str) -> Path:
    """A BPE tokenizer.json with only <unk>, <s>, </s> as specials; its tokenizer_config.json uses `chat_template`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(
        ["def add(a, b): return a + b", "print('hello world')"] * 20, trainer
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "chat_template": chat_template})
    )
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(Hugging Face folder, its megamft conversion): a tiny Llama with a ChatML tokenizer."""
    pytest.importorskip("transformers")
    from data_fixtures import make_hf_tokenizer

    from megamft.checkpoint.hf_convert import hf_to_megatron
    from megamft.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("base")
    tokenizer = make_hf_tokenizer(root / "hf")
    _tiny_llama(root / "hf", load_tokenizer(str(tokenizer)).max_token_id + 1)
    hf_to_megatron(root / "hf", root / "megatron")
    return root / "hf", root / "megatron"


def _export(checkpoint: Path, out: Path, template: Path | None, capsys) -> tuple[int, str]:
    from megamft.checkpoint.convert_cli import main as convert_main

    capsys.readouterr()
    argv = ["megatron-to-hf", "--checkpoint", str(checkpoint), "--out", str(out)]
    code = convert_main(argv + (["--hf-template", str(template)] if template else []))
    return code, capsys.readouterr().err


def test_an_export_records_the_checkpoint_it_was_made_from(converted, tmp_path, capsys):
    hf, megatron = converted
    assert _export(megatron, tmp_path / "export", hf, capsys)[0] == 0
    source = json.loads((tmp_path / "export" / "megamft_source.json").read_text())
    assert (
        source["checkpoint"] == str((megatron / "iter_0000000").resolve())
        and source["iteration"] == 0
    )
    assert (
        source["template"]["folder"] == str(hf.resolve())
        and "tokenizer.json" in source["template"]["files"]
    )
    shutil.copytree(megatron, tmp_path / "copy")  # the same checkpoint elsewhere: the same digest
    assert _export(tmp_path / "copy", tmp_path / "export2", hf, capsys)[0] == 0
    again = json.loads((tmp_path / "export2" / "megamft_source.json").read_text())
    assert again["digest"] == source["digest"] and again["checkpoint"] != source["checkpoint"]
    (tmp_path / "copy" / "iter_0000000" / "megamft_config.json").write_text(
        "{}"
    )  # another checkpoint's config
    from megamft.checkpoint.export_checks import checkpoint_digest

    assert checkpoint_digest(tmp_path / "copy" / "iter_0000000") != source["digest"]


def test_a_template_of_another_model_size_is_refused(converted, tmp_path, capsys):
    hf, megatron = converted
    template = tmp_path / "other"
    shutil.copytree(hf, template)
    config = json.loads((hf / "config.json").read_text())
    _tiny_llama(template, config["vocab_size"], hidden=64)  # another model with the same tokenizer
    code, err = _export(megatron, tmp_path / "export", template, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        f"--hf-template {template} does not fit the checkpoint's model: config.json has hidden_size=64, "
        "the model 32" in err
    )
    assert not (tmp_path / "export").exists()


def test_a_template_whose_tokenizer_has_ids_past_the_vocabulary_is_refused(
    converted, tmp_path, capsys
):
    from data_fixtures import with_special_token_at

    hf, megatron = converted
    template = tmp_path / "other"
    shutil.copytree(hf, template)
    with_special_token_at(hf / "tokenizer.json", template, token_id=70000)
    code, err = _export(megatron, tmp_path / "export", template, capsys)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    assert (
        code == 2
        and f"tokenizer.json has ids up to 70000, the model's vocabulary {vocab} rows" in err
    )


def test_a_template_lacking_the_special_tokens_of_its_chat_template_is_refused(
    converted, tmp_path, capsys
):
    from data_fixtures import CHATML_TEMPLATE

    hf, megatron = converted
    template = tmp_path / "other"
    shutil.copytree(hf, template)
    _simple_tokenizer(template, CHATML_TEMPLATE)  # ChatML markup, but no <|im_start|> token
    code, err = _export(megatron, tmp_path / "export", template, capsys)
    assert (
        code == 2
        and "the chat template uses '<|im_end|>', which is not a token of tokenizer.json" in err
    )
    assert "'<|im_start|>', which is not a token" in err


def test_a_template_with_another_tokenizer_than_the_training_datas_is_refused(
    converted, tmp_path, capsys
):
    """megamft_data.json of a training checkpoint names the tokenizer file the data was made with."""
    hf, megatron = converted
    checkpoint = tmp_path / "run"
    shutil.copytree(megatron, checkpoint)
    trained_with = {
        "kind": "huggingface",
        "file": "tokenizer.json",
        "sha256": hashlib.sha256(b"other").hexdigest(),
    }
    (checkpoint / "iter_0000000" / "megamft_data.json").write_text(
        json.dumps({"tasks": {}, "tokenizer": trained_with})
    )
    code, err = _export(checkpoint, tmp_path / "export", hf, capsys)
    assert (
        code == 2
        and "its tokenizer.json is not the tokenizer.json the training data was tokenized with"
        in err
    )
    trained_with["sha256"] = hashlib.sha256((hf / "tokenizer.json").read_bytes()).hexdigest()
    (checkpoint / "iter_0000000" / "megamft_data.json").write_text(
        json.dumps({"tasks": {}, "tokenizer": trained_with})
    )
    assert _export(checkpoint, tmp_path / "export", hf, capsys)[0] == 0
