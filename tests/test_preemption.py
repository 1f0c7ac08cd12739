"""Killed runs resume exactly: SIGTERM mid-run saves and exits; SIGKILL mid-write loses nothing complete.

Each run is `python -m megamft train` on two real processes (TP=2). Losses per
step are read from the runs' tensorboard files (float32, every step) and the
stitched interrupted curve must equal the uninterrupted one step by step.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamft.checkpoint.layout import iteration_dir, latest_iteration
from megamft.testing.distributed import _rank_env, free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
          "data.seq_length=192", "data.max_samples_per_task=24", "data.valid_samples_per_task=4",
          "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
          "train.lr_warmup_steps=1", f"train.train_steps={STEPS}", "parallel.tensor_model_parallel_size=2"]


def _start(tmp: Path, name: str, *overrides: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        log = open(tmp / f"{name}-rank{rank}.log", "w")
        cmd = [sys.executable, "-m", "megamft", "train", *COMMON, f"train.tensorboard_dir={tmp / name / 'tb'}",
               *overrides]
        procs.append(subprocess.Popen(cmd, env=_rank_env(rank, 2, port), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=ROOT))
    return procs


def _wait(procs, timeout=240) -> list[int]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def _losses(tb_dirs: list[Path]) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for folder in tb_dirs:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        losses.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert _wait(_start(tmp, "run", f"checkpoint.save_dir={tmp / 'ckpt'}")) == [0, 0]
    losses = _losses([tmp / "run" / "tb"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _resume_and_compare(tmp: Path, save_dir: Path, first_tb: Path, uninterrupted: dict) -> None:
    assert _wait(_start(tmp, "resumed", f"checkpoint.save_dir={save_dir}", f"checkpoint.load_dir={save_dir}")) == [0, 0]
    stitched = _losses([first_tb, tmp / "resumed" / "tb"])
    assert sorted(stitched) == list(range(1, STEPS + 1))
    for step, loss in uninterrupted.items():
        assert abs(stitched[step] - loss) <= 1e-5 * abs(loss), (step, stitched, uninterrupted)


def _wait_for(predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def test_sigterm_saves_and_exits_then_resumes_exactly(tmp_path, uninterrupted):
    save_dir = tmp_path / "ckpt"
    procs = _start(tmp_path, "first", f"checkpoint.save_dir={save_dir}", "train.eval_interval=0")
    log = tmp_path / "first-rank0.log"
    _wait_for(lambda: "step 2/" in log.read_text())
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the other must stop with it
    assert _wait(procs) == [0, 0]
    stopped = latest_iteration(save_dir)
    assert 2 <= stopped < STEPS, stopped
    assert "preemption signal: stopped after step" in log.read_text()
    _resume_and_compare(tmp_path, save_dir, tmp_path / "first" / "tb", uninterrupted)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, uninterrupted):
    save_dir = tmp_path / "ckpt"
    procs = _start(tmp_path, "first", f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=1")
    _wait_for(lambda: (save_dir / "iter_0000003.partial").exists())
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
    _wait(procs)
    latest = latest_iteration(save_dir)
    assert latest in (1, 2)  # step 3 was being written: never the latest
    assert (iteration_dir(save_dir, latest) / "metadata.json").is_file()
    first_tb = tmp_path / "first" / "tb"
    # Steps after the checkpoint are redone by the resumed run; keep the first run's up to it.
    kept = {s: v for s, v in _losses([first_tb]).items() if s <= latest}
    assert sorted(kept) == list(range(1, latest + 1))
    assert _wait(_start(tmp_path, "resumed", f"checkpoint.save_dir={save_dir}",
                        f"checkpoint.load_dir={save_dir}")) == [0, 0]
    stitched = {**kept, **_losses([tmp_path / "resumed" / "tb"])}
    for step, loss in uninterrupted.items():
        assert abs(stitched[step] - loss) <= 1e-5 * abs(loss), (step, stitched, uninterrupted)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    save_dir = tmp_path / "ckpt"
    assert _wait(_start(tmp_path, "run", f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=1",
                        "checkpoint.keep_last=2", "train.train_steps=4")) == [0, 0]
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    assert latest_iteration(save_dir) == 4
