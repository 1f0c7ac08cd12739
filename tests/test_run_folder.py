"""What a user types never loses work: save folders, locks, automatic resume, conversion outputs.

Each test makes the user's mistake first, then checks that megamft refuses it with one clear
message and that nothing of the user's was changed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jobs
import pytest

from megamft.checkpoint.convert_cli import main as convert_main
from megamft.checkpoint.layout import latest_iteration
from megamft.platform.folder_lock import LOCK_NAME
from megamft.testing.forked_command import run_module

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    *jobs.TINY_MODEL,
    "model.num_layers=2",
    "data.max_samples_per_task=24",
    "data.valid_samples_per_task=4",
    "train.lr_warmup_steps=0",
]


def _train(save_dir: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`megamft train` as a user types it, one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_module(
        "megamft",
        ["train", *RUN, f"checkpoint.save_dir={save_dir}", *overrides],
        env,
        ROOT,
        timeout,
    )


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_rerun_of_the_same_command_continues_the_run(tmp_path):
    first = _train(tmp_path, "train.train_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(
        tmp_path, "train.train_steps=3"
    )  # what a requeue does: the same command, more steps
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {tmp_path} at iteration 2" in again.stderr
    assert "step 3/3 | loss" in again.stderr and "step 1/3" not in again.stderr
    assert latest_iteration(tmp_path) == 3


def test_a_save_folder_of_another_run_is_refused(tmp_path):
    assert _train(tmp_path, "train.train_steps=2").returncode == 0
    before = _snapshot(tmp_path)
    other = _train(tmp_path, "train.train_steps=2", "train.seed=7", "loss.mode=token")
    assert other.returncode != 0
    assert (
        "holds another run's checkpoints" in other.stderr
        and "train.seed: 1234 -> 7" in other.stderr
    )
    assert "loss.mode: 'task_token' -> 'token'" in other.stderr
    assert _snapshot(tmp_path) == before


def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    assert _train(tmp_path, "train.train_steps=1").returncode == 0
    lock = tmp_path / LOCK_NAME
    owner = {
        "host": os.uname().nodename,
        "pid": os.getpid(),
        "started": 0.0,
        "command": "training run",
    }
    lock.write_text(json.dumps(owner))  # a live process (this test) holds it
    busy = _train(tmp_path, "train.train_steps=2")
    assert busy.returncode != 0 and f"pid {os.getpid()}" in busy.stderr and "in use" in busy.stderr
    assert latest_iteration(tmp_path) == 1
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(json.dumps({**owner, "pid": int(dead.stdout)}))  # its process is gone
    taken = _train(tmp_path, "train.train_steps=2")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert (
        "took over the lock of a run that is gone" in taken.stderr
        and latest_iteration(tmp_path) == 2
    )
    assert not lock.exists()  # released at the end


def test_a_folder_of_other_files_is_refused_as_save_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("my work")
    refused = _train(tmp_path, "train.train_steps=1")
    assert refused.returncode != 0 and "files that megamft did not write" in refused.stderr
    assert _snapshot(tmp_path) == {"notes.txt": 7}


def test_an_unwritable_save_dir_is_found_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    refused = _train(tmp_path / "file" / "run", "train.train_steps=1")
    assert refused.returncode != 0 and "cannot be written" in refused.stderr
    assert "step 1/1" not in refused.stderr


def test_a_checkpoint_of_another_model_is_refused_even_when_shapes_match(tmp_path):
    assert _train(tmp_path / "a", "train.train_steps=1").returncode == 0
    changed = _train(
        tmp_path / "b",
        "train.train_steps=1",
        f"checkpoint.load_dir={tmp_path / 'a'}",
        "model.rotary_base=500000",
        "model.norm_epsilon=1e-6",
    )
    assert changed.returncode != 0
    assert "model.norm_epsilon" in changed.stderr and "model.rotary_base" in changed.stderr
    deliberate = _train(
        tmp_path / "c",
        "train.train_steps=1",
        f"checkpoint.load_dir={tmp_path / 'a'}",
        "model.rotary_base=500000",
        "checkpoint.allow_config_change=true",
    )
    assert deliberate.returncode == 0, deliberate.stderr[-3000:]


# ---- conversion outputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A training run's save folder: the checkpoint the export tests read."""
    save_dir = tmp_path_factory.mktemp("trained") / "run"
    assert _train(save_dir, "train.train_steps=1").returncode == 0
    return str(save_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert convert_main(["megatron-to-hf", "--checkpoint", trained, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("where", ["checkpoint", "parent", "iteration"])
def test_export_never_replaces_a_folder_holding_its_input(where, trained, tmp_path, capsys):
    checkpoint = Path(trained)
    out = {
        "checkpoint": checkpoint,
        "parent": checkpoint.parent,
        "iteration": checkpoint / "iter_0000001",
    }[where]
    before = _snapshot(checkpoint)
    assert (
        convert_main(
            ["megatron-to-hf", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]
        )
        == 2
    )
    assert "holds the input" in capsys.readouterr().err
    assert _snapshot(checkpoint) == before


def test_export_refuses_a_folder_of_other_work_unless_overwrite(trained, tmp_path, capsys):
    (tmp_path / "paper.tex").write_text("draft")
    assert convert_main(["megatron-to-hf", "--checkpoint", trained, "--out", str(tmp_path)]) == 2
    assert (
        "--overwrite" in capsys.readouterr().err and (tmp_path / "paper.tex").read_text() == "draft"
    )
    assert (
        convert_main(
            ["megatron-to-hf", "--checkpoint", trained, "--out", str(tmp_path), "--overwrite"]
        )
        == 0
    )
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "paper.tex").exists()
    # its own earlier export is replaced without asking, as a rerun would
    assert convert_main(["megatron-to-hf", "--checkpoint", trained, "--out", str(tmp_path)]) == 0


def test_hf_to_megatron_refuses_an_existing_training_folder(exported, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "train.train_steps=1").returncode == 0
    before = _snapshot(run)
    assert convert_main(["hf-to-megatron", "--hf", str(exported), "--out", str(run)]) == 2
    assert "not a hf-to-megatron output" in capsys.readouterr().err
    assert _snapshot(run) == before and latest_iteration(run) == 1
    converted = tmp_path / "converted"
    assert convert_main(["hf-to-megatron", "--hf", str(exported), "--out", str(converted)]) == 0
    assert (
        convert_main(["hf-to-megatron", "--hf", str(exported), "--out", str(converted)]) == 0
    )  # a rerun
    assert latest_iteration(converted) == 0


def test_load_dir_is_a_base_when_save_dir_is_new(tmp_path):
    """The documented fine-tune command: load_dir names the base, no load_optimizer flag needed."""
    assert _train(tmp_path / "base", "train.train_steps=2").returncode == 0
    tuned = _train(
        tmp_path / "tuned", "train.train_steps=1", f"checkpoint.load_dir={tmp_path / 'base'}"
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert (
        f"starting from the weights of {tmp_path / 'base'}" in tuned.stderr
        and "step 1/1" in tuned.stderr
    )


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    assert _train(tmp_path, "train.train_steps=2", "checkpoint.save_interval=1").returncode == 0
    shard = sorted((tmp_path / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    broken = _train(tmp_path, "train.train_steps=3")
    assert broken.returncode != 0
    assert (
        "iter_0000002 cannot be read" in broken.stderr
        and "checkpoint.load_iteration=N" in broken.stderr
    )
    rolled_back = _train(
        tmp_path,
        "train.train_steps=3",
        f"checkpoint.load_dir={tmp_path}",
        "checkpoint.load_iteration=1",
    )
    assert rolled_back.returncode == 0, rolled_back.stderr[-3000:]
    assert f"resuming {tmp_path} at iteration 1" in rolled_back.stderr


def test_data_from_another_tokenizer_than_the_models_is_named(tmp_path):
    from megamft.checkpoint.run_folder import tokenizer_mismatch
    from megamft.data.tokenizer import file_sha256

    converted = tmp_path / "converted"
    (converted / "hf").mkdir(parents=True)
    (converted / "hf" / "tokenizer.json").write_text('{"model": "the model\'s own"}')
    other = tmp_path / "tokenizer.json"
    other.write_text('{"model": "another one"}')
    manifest = {
        "tokenizer": {"kind": "huggingface", "file": "tokenizer.json", "sha256": file_sha256(other)}
    }
    problem = tokenizer_mismatch(manifest, converted)
    assert (
        problem and str(converted / "hf" / "tokenizer.json") in problem and "--tokenizer" in problem
    )
    manifest["tokenizer"]["sha256"] = file_sha256(converted / "hf" / "tokenizer.json")
    assert tokenizer_mismatch(manifest, converted) is None
    assert (
        tokenizer_mismatch({"tokenizer": {"kind": "byte"}}, converted) is None
    )  # nothing to compare
