"""Kill -9 at seeded moments of training and of saving; re-running the same command always resumes.

One chain of runs: each run is killed (SIGKILL, no clean-up) at the next chosen moment
(megamft.platform.kill_points), and the same command is run again, until a run finishes.
Every run must resume from a complete checkpoint (never a damaged one), and the loss of every
step, whichever run computed it last, must equal the uninterrupted run's.
"""

import os
import random
import re
import signal
import subprocess
from pathlib import Path

import jobs
import pytest

from megamft.checkpoint.layout import latest_iteration
from megamft.platform.kill_points import ENV, MOMENTS
from megamft.testing.forked_command import run_module

ROOT = Path(__file__).resolve().parents[1]
STEPS = 22
COMMAND = [
    *jobs.TINY_MODEL,
    "model.num_layers=2",
    "data.max_samples_per_task=24",
    "data.valid_samples_per_task=4",
    "train.eval_interval=0",
    f"train.train_steps={STEPS}",
    "checkpoint.save_interval=1",
    "checkpoint.keep_last=2",
]
STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss ([0-9.]+)")


def _run(save_dir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The same command each time (a process forked from the test server: no imports to wait for); its
    output in stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    return run_module(
        "megamft",
        ["train", *COMMAND, f"checkpoint.save_dir={save_dir}"],
        env,
        ROOT,
        timeout=300,
        merge_output=True,
    )


def _losses(stderr: str) -> dict[int, str]:
    return {int(step): loss for step, loss in STEP_LINE.findall(stderr)}


def _kill_moments(seed: int) -> list[str]:
    """10 moments after a step's update and 10 inside saves, at increasing iterations."""
    rng = random.Random(seed)
    iterations = sorted(rng.sample(range(1, STEPS), 20))
    kinds = ["step.done"] * 10 + [rng.choice(MOMENTS[1:]) for _ in range(10)]
    rng.shuffle(kinds)
    return [f"{kind}@{iteration}" for kind, iteration in zip(kinds, iterations)]


@pytest.mark.slow
def test_killed_anywhere_the_same_command_resumes_the_same_run(tmp_path):
    reference = _run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = _losses(reference.stderr)
    assert sorted(want) == list(range(1, STEPS + 1))

    save_dir, got, killed = tmp_path / "killed", {}, []
    for moment in _kill_moments(seed=20261126):
        before = latest_iteration(save_dir) if (save_dir / "latest").exists() else None
        run = _run(save_dir, kill_at=moment)
        assert run.returncode == -signal.SIGKILL, (moment, run.returncode, run.stderr[-3000:])
        killed.append(moment)
        if before is not None:  # it resumed from the newest complete checkpoint there was
            assert f"resuming {save_dir} at iteration {before}" in run.stderr, (
                moment,
                run.stderr[-2000:],
            )
        got.update(_losses(run.stderr))
    final = _run(save_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    got.update(_losses(final.stderr))
    assert len(killed) == 20 and latest_iteration(save_dir) == STEPS
    assert got == want, {
        step: (got.get(step), want[step]) for step in want if got.get(step) != want[step]
    }
    assert not list(save_dir.glob("*.partial"))  # every interrupted save was redone and completed
