"""`megamft train` with loss.objective=dpo on megamft-preprocess'd pairs: it trains from DPO's ln 2, logs
per-task preference metrics, resumes exactly after a kill (the stored reference read back), and DP=2 equals
DP=1 (the reference and every step's loss); loss.reference_dir takes the reference from another checkpoint."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamft.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "data.seq_length=64",
    "data.valid_samples_per_task=8",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.train_steps=4",
    "train.lr_warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=2",
    "checkpoint.save_interval=1",
    "optimizer.lr=3e-3",
]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _train(
    data: Path,
    save_dir: Path,
    *args: str,
    ranks: int = 1,
    env: dict | None = None,
    command: str = "train",
):
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-port",
        str(free_port()),
    ]
    cmd = [
        sys.executable,
        *(launcher if ranks > 1 else []),
        "-m",
        "megamft",
        command,
        "--config",
        str(ROOT / "examples" / "dpo.yaml"),
        *SMALL,
        f"data.path={data}",
        f"checkpoint.save_dir={save_dir}",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env or _env(), cwd=ROOT
    )


def _scalars(save_dir: Path) -> dict[int, dict]:
    """The last value written for each step (a resumed run rewrites the steps after its checkpoint)."""
    steps: dict[int, dict] = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record.pop("step"), {}).update(record)
    return steps


def _losses(save_dir: Path) -> list[float]:
    steps = _scalars(save_dir)
    return [steps[s]["train/loss"] for s in sorted(steps) if "train/loss" in steps[s]]


def _table(save_dir: Path) -> np.ndarray:
    with np.load(save_dir / "reference_logps.npz") as stored:
        return stored["task_0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pairs")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "data" / "synthetic_preferences.py"),
            str(tmp / "pairs.jsonl"),
            "--pairs",
            "40",
        ],
        check=True,
        cwd=ROOT,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megamft.data.preprocess_cli",
            "--task",
            f"sort={tmp / 'pairs.jsonl'}",
            "--out",
            str(tmp / "data"),
            "--max-seq-length",
            "65",
            "--overlong",
            "drop",
            "--quiet",
        ],
        check=True,
        cwd=ROOT,
        env=_env(),
    )
    return tmp / "data"


@pytest.fixture(scope="module")
def uninterrupted(pairs, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("whole") / "run"
    done = _train(pairs, save_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "step 4/4 | loss" in done.stderr and "sort acc " in done.stderr
    )  # per-task metrics in the log line
    assert "held-out preference accuracy per task" in done.stdout
    return save_dir


@pytest.mark.slow
def test_dpo_trains_from_ln2_with_preference_metrics(uninterrupted):
    steps = _scalars(uninterrupted)
    assert steps[1]["train/loss"] == pytest.approx(
        math.log(2), rel=1e-6
    )  # the reference is the starting model
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert f"train/{name}/sort" in steps[4] and f"valid/{name}/sort" in steps[4]
    assert steps[4]["train/loss"] < math.log(2)
    assert (uninterrupted / "reference_logps.npz").is_file()


@pytest.mark.slow
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(pairs, uninterrupted, tmp_path):
    save_dir = tmp_path / "run"
    killed = _train(pairs, save_dir, env=_env(MEGAMFT_KILL_AT="step.done@3"))
    assert (
        killed.returncode != 0 and "step 2/4" in killed.stderr and "step 3/4" not in killed.stderr
    )
    resumed = _train(pairs, save_dir, f"checkpoint.load_dir={save_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 3/4" in resumed.stderr and "step 2/4" not in resumed.stderr
    assert _losses(save_dir) == pytest.approx(_losses(uninterrupted), rel=1e-6)


MEANING = ("train/loss", "train/lr", "train/grad_norm", "train/skipped", "train/rewards/", "valid/")
"""The logged values that must not change with the rows' layout (speed and memory may)."""


@pytest.mark.slow
def test_packed_pairs_train_as_the_padded_ones(pairs, uninterrupted, tmp_path):
    """data.mode=pack in rows of 128 (padded: 64, which changes nothing for a causal model): the same
    reference table, and every step's loss, gradient norm, learning rate and
    train/valid preference metrics as the padded run (the same math on the same tokens, in fewer rows)."""
    save_dir = tmp_path / "run"
    done = _train(pairs, save_dir, "data.mode=pack", "data.seq_length=128")  # 2-3 documents a row
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(_table(save_dir), _table(uninterrupted), rtol=1e-5)
    packed, padded = _scalars(save_dir), _scalars(uninterrupted)
    assert sorted(packed) == sorted(padded)
    compared = 0
    for step, want in padded.items():
        for key, value in want.items():
            if key.startswith(MEANING):
                assert packed[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
                compared += 1
    assert compared > 4 * 8


@pytest.fixture(scope="module")
def start(pairs, tmp_path_factory) -> Path:
    """A 2-step run: weights that every layout loads (a fresh initialization depends on the layout)."""
    save_dir = tmp_path_factory.mktemp("start") / "run"
    assert _train(pairs, save_dir, "train.train_steps=2").returncode == 0
    return save_dir


@pytest.fixture(scope="module")
def from_start(pairs, start, tmp_path_factory) -> Path:
    """4 steps from `start`'s weights, one process: its reference is `start`'s model."""
    save_dir = tmp_path_factory.mktemp("from_start") / "run"
    done = _train(pairs, save_dir, f"checkpoint.load_dir={start}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(save_dir)[0] == pytest.approx(math.log(2), rel=1e-6)
    return save_dir


LAYOUTS = {
    "dp2": (),
    "tp2": ("parallel.tensor_model_parallel_size=2",),
    "pp2": ("parallel.pipeline_model_parallel_size=2",),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_equal_one(pairs, start, from_start, tmp_path, layout):
    """The reference table, every step's loss and the held-out reward margin at DP=2, TP=2 or PP=2 against
    the one-process run, all from the same weights (TP and PP sum in another order: float32 rounding)."""
    save_dir = tmp_path / "run"
    done = _train(pairs, save_dir, f"checkpoint.load_dir={start}", *LAYOUTS[layout], ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(_table(save_dir), _table(from_start), rtol=1e-5)
    assert _losses(save_dir) == pytest.approx(_losses(from_start), rel=1e-5)
    valid = [_scalars(d)[4]["valid/rewards/margin/sort"] for d in (save_dir, from_start)]
    assert valid[0] == pytest.approx(valid[1], rel=1e-3)


@pytest.mark.slow
def test_reference_from_another_checkpoint(pairs, uninterrupted, start, from_start, tmp_path):
    """Starting from the uninterrupted run's weights (step 4) with loss.reference_dir = the 2-step run: the table
    is the one a run starting from the 2-step weights computes, and the first loss is not ln 2."""
    other = _train(
        pairs,
        tmp_path / "other",
        f"checkpoint.load_dir={uninterrupted}",
        f"loss.reference_dir={start}",
    )
    assert other.returncode == 0, other.stderr[-3000:]
    np.testing.assert_allclose(_table(tmp_path / "other"), _table(from_start), rtol=1e-6)
    assert np.abs(_table(tmp_path / "other") - _table(uninterrupted)).max() > 1e-3
    assert _losses(tmp_path / "other")[0] != pytest.approx(math.log(2), rel=1e-4)


MOE = (
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_aux_loss_coeff=0.01",
    "model.moe_z_loss_coeff=0.001",
    "optimizer.use_distributed_optimizer=false",
)


@pytest.mark.slow
def test_expert_parallel_equals_one_process(pairs, tmp_path):
    """A tiny MoE model from the same weights, DPO at EP=2 (so DP=2) against one process: the reference table,
    every step's loss and gradient norm (router losses included), the router losses and the per-task expert
    shares each step logs, and the held-out reward margin."""
    start = tmp_path / "start"
    assert _train(pairs, start, *MOE, "train.train_steps=2").returncode == 0
    runs = {}
    for name, ranks, layout in (
        ("one", 1, ()),
        ("ep2", 2, ("parallel.expert_model_parallel_size=2",)),
    ):
        runs[name] = tmp_path / name
        done = _train(pairs, runs[name], *MOE, f"checkpoint.load_dir={start}", *layout, ranks=ranks)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "experts (top 3 per task, all layers): sort " in done.stderr
    np.testing.assert_allclose(_table(runs["ep2"]), _table(runs["one"]), rtol=1e-5)
    one, ep2 = _scalars(runs["one"]), _scalars(runs["ep2"])
    assert _losses(runs["ep2"]) == pytest.approx(_losses(runs["one"]), rel=1e-5)
    assert _losses(runs["one"])[-1] < math.log(2)
    for step in range(1, 5):
        checked = [k for k in one[step] if k.startswith(("train/router/", "experts/"))]
        assert {"train/router/load_balancing", "train/router/z_loss"} <= set(checked)
        assert any(k.startswith("experts/sort/") for k in checked)
        for key in ["train/grad_norm", *checked]:
            assert ep2[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    assert ep2[4]["valid/rewards/margin/sort"] == pytest.approx(
        one[4]["valid/rewards/margin/sort"], rel=1e-3
    )


@pytest.mark.slow
def test_reference_command_stores_the_table_the_run_then_reads(
    pairs, uninterrupted, start, from_start, tmp_path
):
    """`megamft reference` at TP=2 with loss.reference_dir = the 2-step run: the table a one-process run
    starting from those weights computes; the following `megamft train` of the same config reads it (not
    rewritten, the reference's weights never loaded), and a run whose reference differs refuses it."""
    save_dir = tmp_path / "run"
    same = (
        f"checkpoint.load_dir={uninterrupted}",
        f"loss.reference_dir={start}",
        "parallel.tensor_model_parallel_size=2",
    )
    done = _train(pairs, save_dir, *same, ranks=2, command="reference")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"reference log-probabilities: {save_dir / 'reference_logps.npz'}" in done.stdout
    assert not list(save_dir.glob("iter_*")) and not (save_dir / "metrics.jsonl").exists()
    np.testing.assert_allclose(_table(save_dir), _table(from_start), rtol=1e-5)
    stored = save_dir / "reference_logps.npz"
    before = (stored.stat().st_mtime_ns, stored.read_bytes())
    trained = _train(pairs, save_dir, *same, ranks=2)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"of 40 pairs read from {stored}" in trained.stderr
    assert "from loss.reference_dir" not in trained.stderr  # its weights were not loaded
    assert (stored.stat().st_mtime_ns, stored.read_bytes()) == before
    assert _losses(save_dir)[0] != pytest.approx(math.log(2), rel=1e-4)

    other = tmp_path / "other"  # the table of `start`, then a run with another reference
    assert _train(pairs, other, *same[:2], command="reference").returncode == 0
    refused = _train(
        pairs, other, f"checkpoint.load_dir={uninterrupted}", f"loss.reference_dir={uninterrupted}"
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("megamft: ") and "were computed for other model" in last, last


@pytest.mark.parametrize(
    "args,named",
    [
        (("loss.objective=orpo",), "loss.objective=orpo has no reference log-probabilities"),
        (
            ("loss.objective=simpo", "checkpoint.load_dir=x"),
            "loss.objective=simpo has no reference log-probabilities",
        ),
        (("loss.objective=sft",), "set loss.objective to dpo"),
        (
            ("checkpoint.load_dir=x", "loss.reference_dir=/no/such/folder"),
            "loss.reference_dir=/no/such/folder holds no complete checkpoint",
        ),
        (("checkpoint.save_dir=null",), "checkpoint.save_dir is not set"),
    ],
)
def test_reference_command_refuses_bad_input_in_one_line(pairs, tmp_path, args, named):
    done = _train(pairs, tmp_path / "run", *args, command="reference")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert not (tmp_path / "run" / "reference_logps.npz").exists()
