"""Code evaluation inside training (the `eval` section) against `megamft eval humaneval` of the same checkpoint.

The reference is independent of megamft's generation code: the checkpoint is exported to a Hugging Face
folder and generated from with transformers (greedy), prompts built and programs run by `megamft eval`.
In-training generation runs megatron's GPTModel at the training layout with megatron's KV cache; the
same completions (token for token) and the same pass@1 must come out, at TP=1 (two data-parallel
replicas, each generating and running its share) and at TP=2. The problem file is made here: two
problems whose prompt opens a string that the test closes, so that almost any completion passes, and
one that a random model fails.
"""

import json
import struct
from pathlib import Path

import jobs
import pytest

from megamft.testing.distributed import launch

PROBLEMS = [
    {
        "task_id": "T/0",
        "prompt": 'def f():\n    return 1\nNOTE = r"""',
        "canonical_solution": "",
        "test": '"""\n\ndef check(c):\n    assert c() == 1\n',
        "entry_point": "f",
    },
    {
        "task_id": "T/1",
        "prompt": "def g():\n",
        "canonical_solution": "    return 2\n",
        "test": "def check(c):\n    assert c() == 2\n",
        "entry_point": "g",
    },
    {
        "task_id": "T/2",
        "prompt": 'def h():\n    return 3\nNOTE = r"""',
        "canonical_solution": "",
        "test": '"""\n\ndef check(c):\n    assert c() == 3\n',
        "entry_point": "h",
    },
]
SETTINGS = (
    "train.train_steps=2",
    "model.num_layers=2",
    "data.valid_samples_per_task=4",
    "eval.interval=2",
    "eval.max_new_tokens=24",
    "eval.prompt_format=chat",
)


def _completions(path: Path) -> list[tuple[str, list[str], list[str]]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        (r["task_id"], [s["completion"] for s in r["samples"]], [s["status"] for s in r["samples"]])
        for r in records
    ]


def _logged(save_dir: Path, name: str) -> dict[int, float]:
    found = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if name in record:
            found[record["step"]] = record[name]
    return found


def wandb_history(folder: Path) -> list[dict]:
    """The logged steps of an offline W&B run, read from its .wandb file: the LevelDB log format (32 KiB
    blocks of records, each a 7-byte header of checksum, length and type) holding wandb_internal_pb2.Record
    messages, after the file's 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2

    data = next(folder.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, history = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return history


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1_dp2", "tp2"])
def test_in_training_pass_at_1_is_megamft_eval_of_the_checkpoint(tmp_path, monkeypatch, layout):
    from megamft.cli import main

    problems = tmp_path / "tiny.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    save_dir = tmp_path / "run"
    overrides = (
        *SETTINGS,
        f"checkpoint.save_dir={save_dir}",
        f"eval.problems={{tiny: {problems}}}",
    )
    if layout == "tp2":  # and W&B, offline, beside TensorBoard
        overrides += ("parallel.tensor_model_parallel_size=2", "train.wandb_project=megamft-test")
        monkeypatch.setenv("WANDB_MODE", "offline")
    launch(jobs.train, 2, kwargs={"overrides": overrides}, timeout=600)
    in_training = _completions(save_dir / "eval" / "step_0000002" / "tiny.jsonl")

    assert (
        main(
            [
                "eval",
                "humaneval",
                str(save_dir / "iter_0000002"),
                "--output",
                str(tmp_path / "he"),
                "--tokenizer",
                "byte",
                "--template",
                "mftcoder",
                "--problems",
                str(problems),
                "--max-new-tokens",
                "24",
                "--k",
                "1",
                "--backend",
                "transformers",
            ]
        )
        == 0
    )
    reference = _completions(tmp_path / "he" / "results.jsonl")
    assert any(
        completions[0].strip() for _, completions, _ in reference
    )  # the model wrote something
    assert in_training == reference
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    assert _logged(save_dir, "eval/tiny/pass@1") == {2: summary["pass_at_k"]["pass@1"]}
    if layout == "tp2":
        history = wandb_history(save_dir)
        assert {h["_step"]: h["eval/tiny/pass@1"] for h in history if "eval/tiny/pass@1" in h} == {
            2: summary["pass_at_k"]["pass@1"]
        }
        assert {h["_step"]: h["train/loss"] for h in history if "train/loss" in h} == _logged(
            save_dir, "train/loss"
        )
        assert [h["memory/estimate_gb"] for h in history if "memory/estimate_gb" in h] == list(
            _logged(save_dir, "memory/estimate_gb").values()
        )
