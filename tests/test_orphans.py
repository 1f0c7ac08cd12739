"""A trainer killed outright (SIGKILL: the OOM killer, kill -9) leaves none of its helper processes behind.

While an asynchronous save is being written, a training rank has helpers: megatron's forked checkpoint
writer, the multiprocessing manager its writer reports through (started with spawn) and multiprocessing's
resource tracker. They block or ignore SIGTERM, so nothing but the kernel ends them once their trainer is
gone. Every process of the run carries the test's marker in its environment (training_runs.processes_with).
"""

from __future__ import annotations

import signal
import uuid

import pytest
from training_runs import kill_all, processes_with, start_ranks, wait_all, wait_for

pytestmark = pytest.mark.slow


def test_a_sigkilled_trainer_leaves_no_helper_process(tmp_path, monkeypatch):
    marker, writing = uuid.uuid4().hex, tmp_path / "writer-started"
    monkeypatch.setenv("MEGAMFT_TEST_RUN", marker)
    monkeypatch.setenv(
        "MEGAMFT_STALL_AT", "save.writing@2:120"
    )  # the writer holds, the helpers alive
    monkeypatch.setenv("MEGAMFT_STALL_MARKER", str(writing))
    ranks = start_ranks(
        tmp_path,
        "run",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.async_save=true",
        "checkpoint.save_interval=2",
    )
    try:
        wait_for(writing.exists, what="the background writer of step 2's checkpoint")
        trainers = {rank.pid for rank in ranks}
        helpers = set(processes_with(marker)) - trainers
        assert len(helpers) >= 3, (
            helpers
        )  # per rank at least its writer; the manager, the resource tracker
        for rank in ranks:
            rank.send_signal(signal.SIGKILL)
        assert wait_all(ranks, timeout=30) == [-signal.SIGKILL] * 2
        try:
            wait_for(lambda: not processes_with(marker), timeout=20, what="every helper ended")
        except TimeoutError:
            left = {pid: _command(pid) for pid in processes_with(marker)}
            pytest.fail(f"helpers outlived their SIGKILLed trainers: {left}")
    finally:
        kill_all(marker)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"
