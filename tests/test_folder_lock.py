"""A folder's lock across hosts: a hard-killed holder's lock is taken over, a live one is refused.

Each test writes the lock file another process would have written (another host, its heartbeat,
its SLURM job) and checks what a new FolderLock does with it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamft.platform.folder_lock import LOCK_NAME, STALE_AFTER_S, FolderLock
from megamft.platform.output_folder import DestinationError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch):
    """This test process as a run outside any scheduler unless a test says otherwise."""
    for name in (
        "SLURM_JOB_ID",
        "SLURM_RESTART_COUNT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
    ):
        monkeypatch.delenv(name, raising=False)


def _other_host_lock(folder: Path, heartbeat_age: float, **job) -> dict:
    """The lock a run on another node writes (its pid means nothing on this host)."""
    now = time.time()
    owner = {
        "host": "gpu-node-17",
        "pid": 4321,
        "started": now - 7200,
        "command": "training run",
        "heartbeat": now - heartbeat_age,
        "token": "0" * 32,
        **job,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(owner))
    return owner


def _held_by(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def test_a_live_lock_from_another_host_is_refused_with_its_owner_named(tmp_path):
    _other_host_lock(tmp_path, heartbeat_age=60)
    with pytest.raises(DestinationError, match="in use") as refused:
        FolderLock(tmp_path, "training run").acquire()
    assert "pid 4321 on gpu-node-17" in str(refused.value) and "last heartbeat 60 s ago" in str(
        refused.value
    )
    assert _held_by(tmp_path)["host"] == "gpu-node-17"  # untouched


def test_a_lock_from_another_host_without_heartbeat_for_the_limit_is_taken_over(tmp_path):
    _other_host_lock(tmp_path, heartbeat_age=STALE_AFTER_S + 30)
    lock = FolderLock(tmp_path, "training run").acquire()
    try:
        assert "pid 4321 on gpu-node-17" in lock.takeover and "no heartbeat for" in lock.takeover
        assert _held_by(tmp_path)["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_another_host(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_JOB_ID", "91234")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _other_host_lock(tmp_path, heartbeat_age=5, slurm_job_id="91234", slurm_restart_count=0)
    lock = FolderLock(tmp_path, "training run").acquire()
    try:
        assert "SLURM job 91234 was requeued (restart 0 -> 1)" in lock.takeover
        assert _held_by(tmp_path)["slurm_restart_count"] == 1
    finally:
        lock.release()


def test_the_same_slurm_job_at_the_same_restart_or_another_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "91234")
    _other_host_lock(tmp_path, heartbeat_age=5, slurm_job_id="91234", slurm_restart_count=0)
    with pytest.raises(DestinationError, match="SLURM job 91234 restart 0"):
        FolderLock(tmp_path, "training run").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "91300")  # another job: its lock's holder may still run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(DestinationError, match="in use"):
        FolderLock(tmp_path, "training run").acquire()


def test_an_unreadable_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "gpu-node-17", "pid": 43')  # not a whole lock
    lock = FolderLock(tmp_path, "preprocess run").acquire()
    try:
        assert "cannot be read" in lock.takeover
    finally:
        lock.release()


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_live_holders_heartbeat_advances_and_stops_on_release(tmp_path):
    lock = FolderLock(tmp_path, "training run", heartbeat_interval=0.05).acquire()
    first = _held_by(tmp_path)["heartbeat"]
    assert _wait(lambda: _held_by(tmp_path)["heartbeat"] > first + 0.04)
    assert _held_by(tmp_path)["started"] == pytest.approx(
        first, abs=1.0
    )  # the holding, not a new one
    beating = lock._beating
    lock.release()
    assert not beating.is_alive() and not (tmp_path / LOCK_NAME).exists()
    time.sleep(0.2)
    assert not (tmp_path / LOCK_NAME).exists()  # no heartbeat writes it back


def test_a_holder_whose_lock_was_taken_over_stops_writing_over_the_new_owner(tmp_path):
    lock = FolderLock(tmp_path, "training run", heartbeat_interval=0.05).acquire()
    newcomer = _other_host_lock(tmp_path, heartbeat_age=0)  # what a run that judged it stale wrote
    assert _wait(lambda: not lock._beating.is_alive(), timeout=5)
    assert _held_by(tmp_path) == newcomer
    lock.release()
    assert _held_by(tmp_path) == newcomer  # release removes only its own lock


def test_the_heartbeat_never_keeps_a_process_alive(tmp_path):
    """A process that ends while holding a lock (no release) exits at once; its lock stays, for the stale rules."""
    code = (
        "import sys; from megamft.platform.folder_lock import FolderLock; "
        "FolderLock(sys.argv[1], 'training run', heartbeat_interval=0.05).acquire(); print('held')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0 and done.stdout.strip() == "held", done.stderr
    left = _held_by(tmp_path)
    # Its process is gone: a run on this host takes the lock over at once.
    lock = FolderLock(tmp_path, "training run").acquire()
    try:
        assert f"process {left['pid']} is no longer running" in lock.takeover
    finally:
        lock.release()
