"""Short real training runs for the preemption tests, and the losses they log.

Every run trains the same tiny model (TP=2 over two processes) for STEPS steps
and logs the loss of every step to tensorboard (float32), so an interrupted and
resumed run can be stitched and compared step by step with an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megamft.testing.distributed import _rank_env, free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
SETTINGS = {
    "model.num_layers": 2,
    "model.hidden_size": 32,
    "model.ffn_hidden_size": 64,
    "data.seq_length": 192,
    "data.max_samples_per_task": 24,
    "data.valid_samples_per_task": 4,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 2,
    "train.log_interval": 1,
    "train.lr_warmup_steps": 1,
    "train.train_steps": STEPS,
    "parallel.tensor_model_parallel_size": 2,
}
COMMON = [f"{key}={value}" for key, value in SETTINGS.items()]


def start_ranks(tmp: Path, name: str, *overrides: str) -> list[subprocess.Popen]:
    """Both ranks as plain `python -m megamft train` processes (no launcher); logs in tmp/NAME-rankR.log."""
    port = free_port()
    procs = []
    for rank in range(2):
        log = open(tmp / f"{name}-rank{rank}.log", "w")
        cmd = [
            sys.executable,
            "-m",
            "megamft",
            "train",
            *COMMON,
            f"train.tensorboard_dir={tmp / name / 'tb'}",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env=_rank_env(rank, 2, port),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        )
    return procs


def wait_all(procs, timeout=240) -> list[int]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def losses(tb_dirs: list[Path]) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for folder in tb_dirs:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        found.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return found


def assert_same_curve(stitched: dict[int, float], uninterrupted: dict[int, float]) -> None:
    assert sorted(stitched) == list(range(1, STEPS + 1)), stitched
    for step, loss in uninterrupted.items():
        assert abs(stitched[step] - loss) <= 1e-5 * abs(loss), (step, stitched, uninterrupted)


def wait_for(predicate, timeout=180, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.01)


def processes_with(marker: str) -> list[int]:
    """Pids of every live process whose environment carries MEGAMFT_TEST_RUN=marker (a run and all it spawned)."""
    needle = f"MEGAMFT_TEST_RUN={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(entry):
                pids.append(int(entry.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def _alive(entry: Path) -> bool:
    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def signal_all(marker: str, sig: int, skip: tuple[int, ...] = ()) -> list[int]:
    hit = []
    for pid in processes_with(marker):
        if pid in skip:
            continue
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except ProcessLookupError:
            pass
    return hit


def kill_all(marker: str) -> None:
    signal_all(marker, signal.SIGKILL)
