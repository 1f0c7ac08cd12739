"""Killed runs resume exactly: SIGTERM mid-run saves and exits; SIGKILL mid-write loses nothing complete.

Each run is `python -m megamft train` on two real processes (TP=2). Losses per
step are read from the runs' tensorboard files (float32, every step) and the
stitched interrupted curve must equal the uninterrupted one step by step.
"""

import os
import signal
from pathlib import Path

from training_runs import STEPS, assert_same_curve
from training_runs import losses as _losses
from training_runs import start_ranks as _start
from training_runs import wait_all as _wait
from training_runs import wait_for as _wait_for

from megamft.checkpoint.layout import iteration_dir, latest_iteration


def _resume_and_compare(tmp: Path, save_dir: Path, first_tb: Path, uninterrupted: dict) -> None:
    assert _wait(
        _start(tmp, "resumed", f"checkpoint.save_dir={save_dir}", f"checkpoint.load_dir={save_dir}")
    ) == [0, 0]
    assert_same_curve(_losses([first_tb, tmp / "resumed" / "tb"]), uninterrupted)


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
    procs = _start(
        tmp_path, "first", f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=1"
    )
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
    assert _wait(
        _start(
            tmp_path,
            "resumed",
            f"checkpoint.save_dir={save_dir}",
            f"checkpoint.load_dir={save_dir}",
        )
    ) == [0, 0]
    assert_same_curve({**kept, **_losses([tmp_path / "resumed" / "tb"])}, uninterrupted)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    save_dir = tmp_path / "ckpt"
    assert _wait(
        _start(
            tmp_path,
            "run",
            f"checkpoint.save_dir={save_dir}",
            "checkpoint.save_interval=1",
            "checkpoint.keep_last=2",
            "train.train_steps=4",
        )
    ) == [0, 0]
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    assert latest_iteration(save_dir) == 4
