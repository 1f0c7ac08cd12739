"""Helper processes started during a save are deaf to preemption signals; the saving process is not."""

import multiprocessing
import os
import signal
import time

import pytest

from megamft.platform.launcher import LaunchError, torchrun_arguments
from megamft.platform.signals import (
    PREEMPTION_SIGNALS,
    become_helper_process,
    preemption_signals_deferred,
)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _wait_until_blocked_or_dead(pid: int) -> None:
    """The kernel applies a signal asynchronously: give it a moment to act before looking."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("sig", PREEMPTION_SIGNALS)
def test_a_helper_started_inside_the_block_survives_the_signal(method, sig):
    received = []
    previous = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        context = multiprocessing.get_context(method)
        with preemption_signals_deferred():
            # The resource tracker unblocks SIGTERM when it starts; the block must survive that too.
            context.Semaphore()
            helper = context.Process(target=_sleep, args=(3,))
            helper.start()
            os.kill(helper.pid, sig)
            os.kill(os.getpid(), sig)
            _wait_until_blocked_or_dead(helper.pid)
        # The saving process still records it: when the block ends at the latest (or at once, taken by
        # another of its threads; the handler only sets a flag either way).
        assert received == [sig]
        assert helper.is_alive()
        helper.join()
        assert helper.exitcode == 0

        # Started outside the block (and, for fork, without a handler to inherit): the signal kills it.
        signal.signal(sig, signal.SIG_DFL)
        helper = context.Process(target=_sleep, args=(3,))
        helper.start()
        signal.signal(sig, lambda signum, frame: received.append(signum))
        time.sleep(0.5 if method == "spawn" else 0.1)
        os.kill(helper.pid, sig)
        helper.join()
        assert helper.exitcode == -sig
    finally:
        signal.signal(sig, previous)


def _helper_then_sleep(ready) -> None:
    become_helper_process()
    ready.set()
    time.sleep(2)


def test_become_helper_process_ignores_the_signals():
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    helper = context.Process(target=_helper_then_sleep, args=(ready,))
    helper.start()
    assert ready.wait(120)  # past start-up (slow on a loaded machine), inside the sleep
    for sig in PREEMPTION_SIGNALS:
        os.kill(helper.pid, sig)
    helper.join()
    assert helper.exitcode == 0


def test_launch_keeps_torchruns_options_and_sets_the_agents_signals():
    argv = ["--nproc-per-node", "2", "-m", "megamft", "train", "--config", "x.yaml"]
    assert torchrun_arguments(argv) == ["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv]
    with pytest.raises(LaunchError, match="--signals-to-handle"):
        torchrun_arguments(["--signals-to-handle=SIGTERM", "-m", "megamft", "train"])
    # The program's own arguments are not torchrun's.
    assert torchrun_arguments(["-m", "prog", "--signals-to-handle", "x"])[:2] == [
        "--signals-to-handle",
        "SIGINT,SIGHUP,SIGQUIT",
    ]
