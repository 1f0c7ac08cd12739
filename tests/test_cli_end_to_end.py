"""`megamft train` under torchrun: trains, reports, checkpoints, resumes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamft.checkpoint.layout import latest_iteration
from megamft.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "data.seq_length=192",
    "data.max_samples_per_task=24",
    "data.valid_samples_per_task=4",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.log_interval=1",
    "train.lr_warmup_steps=1",
]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "megamft",
        "train",
        "--config",
        str(ROOT / "examples" / "quickstart.yaml"),
        *SMALL,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_train_reports_checkpoints_and_resumes(tmp_path):
    first = _torchrun("train.train_steps=2", f"checkpoint.save_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "validation loss per task (before -> after fine-tuning):" in first.stdout
    for task in ("code_completion", "text_to_code", "code_to_docstring"):
        assert task in first.stdout
    assert "step 2/2 | loss" in first.stderr  # the log line
    assert latest_iteration(tmp_path) == 2
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    for task in ("code_completion", "text_to_code", "code_to_docstring"):
        assert {
            f"train/loss/{task}",
            f"train/ppl/{task}",
            f"train/tokens/{task}",
            f"train/weight/{task}",
            f"valid/loss/{task}",
            f"valid/ppl/{task}",
        } <= set(scalars)
        assert [e.step for e in scalars[f"train/tokens/{task}"]] == [1, 2]  # every step

    resumed = _torchrun(
        "train.train_steps=3", f"checkpoint.save_dir={tmp_path}", f"checkpoint.load_dir={tmp_path}"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 3/3 | loss" in resumed.stderr and "step 1/3" not in resumed.stderr
    assert latest_iteration(tmp_path) == 3


def _tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def test_embedded_dataset_script_builds_indexed_data_that_trains(tmp_path):
    """examples/data/build_embedded_dataset.sh: JSONL export, tokenizer training, preprocessing; then train on it."""
    built = subprocess.run(
        ["bash", str(ROOT / "examples" / "data" / "build_embedded_dataset.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((tmp_path / "indexed" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == [
        "code_completion",
        "text_to_code",
        "code_to_docstring",
    ]
    assert manifest["tokenizer"]["kind"] == "sentencepiece" and manifest["options"][
        "decontaminate"
    ] == ["humaneval"]
    assert all(t["documents"] > 1000 for t in manifest["tasks"])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "megamft",
        "train",
        "--config",
        str(ROOT / "examples" / "quickstart_indexed.yaml"),
        *SMALL,
        f"data.path={tmp_path / 'indexed'}",
        "train.train_steps=2",
        "checkpoint.save_dir=null",
    ]
    trained = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "step 2/2 | loss" in trained.stderr


@pytest.mark.skipif(
    not (torch.cuda.device_count() >= 2 and importlib.util.find_spec("transformer_engine")),
    reason="context parallelism runs in Transformer Engine's attention: needs 2 GPUs and TE",
)
def test_context_parallel_trains_like_one_rank(tmp_path):
    """GPU only: CP=2 gives the losses of CP=1 (same data, same initial weights from the seed)."""
    import re

    def losses(cp: int) -> list[float]:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(cp),
            "--master-port",
            str(free_port()),
            "-m",
            "megamft",
            "train",
            "--config",
            str(ROOT / "examples" / "quickstart.yaml"),
            *SMALL,
            "parallel.tensor_model_parallel_size=1",
            f"parallel.context_parallel_size={cp}",
            "data.mode=pad",
            "train.train_steps=3",
            "checkpoint.save_dir=null",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        return [float(x) for x in re.findall(r"step \d+/3 \| loss ([\d.]+)", run.stderr)]

    one, two = losses(1), losses(2)
    assert len(one) == 3 and all(abs(a - b) <= 2e-3 * a for a, b in zip(one, two)), (one, two)
