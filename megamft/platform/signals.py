"""Preemption signals reach the training processes, never the helper processes they start.

Launchers signal more than one process: torchrun forwards a signal to each
worker's whole process group, and SLURM signals every process of a job step.
Both reach the helper processes of a worker too (megatron's checkpoint writers,
the multiprocessing manager that collects their results, asynchronous save
workers). A helper killed mid-save breaks the very checkpoint the signal asked
for, so helpers are made deaf to these signals:

- ``preemption_signals_deferred`` blocks them in the saving thread while it saves.
  A child process inherits its creator's signal mask, through fork and exec
  alike, so every helper created inside the block never receives them. The
  worker itself still records the signal (when the block ends, or at once if
  another of its threads takes it: the handler only sets a flag) and stops at
  the next step boundary.
- ``become_helper_process`` is for helpers megamft starts itself (preprocessing
  workers): they ignore the signals for good, Ctrl-C's SIGINT too (a terminal sends
  it to the whole foreground process group), and the kernel kills them when their
  parent dies, so the parent alone decides what a signal does and cleans up.
  ``helper_spawn_context`` starts them with these signals blocked, so that one sent
  while a helper is still starting up waits, and is dropped once the helper ignores it.

A trainer killed outright (SIGKILL: the OOM killer, kill -9) runs no clean-up, and
its helpers block or ignore SIGTERM, so they would live on, orphaned, holding memory.
``helpers_die_with_this_process`` makes every process it forks from then on die with
it (the kernel's parent-death signal); megatron's checkpoint manager, which it starts
with spawn, gets the same through megatron_fixes. Multiprocessing's resource tracker
ends by itself once every process holding its pipe has.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from multiprocessing import context, resource_tracker
from typing import Iterator

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What schedulers send before they stop a job: SIGTERM (torchrun, Kubernetes), SIGUSR1 (SLURM's --signal)."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@contextlib.contextmanager
def preemption_signals_deferred() -> Iterator[None]:
    """Hold the preemption signals back from this process and every process it starts meanwhile."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    # multiprocessing's resource tracker, started with the first helper, unblocks SIGTERM (and SIGINT)
    # when it has started, whatever the mask was: start it now, inside the block, and block again.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


HELPER_IGNORES = (*PREEMPTION_SIGNALS, signal.SIGINT)
"""What a helper process ignores: the preemption signals and Ctrl-C; its parent handles them."""


def become_helper_process() -> None:
    """Ignore the preemption signals and Ctrl-C, and die with the parent (Linux); for helper processes only."""
    for sig in HELPER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK, HELPER_IGNORES
    )  # ignored now: a pending one is dropped
    die_with_parent()


class _HelperProcess(context.SpawnProcess):
    """A spawned process that starts with HELPER_IGNORES blocked (the mask survives fork and exec)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_IGNORES)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(
                signal.SIG_SETMASK, previous
            )  # one that came meanwhile is delivered now


class _HelperSpawnContext(context.SpawnContext):
    Process = _HelperProcess


def helper_spawn_context() -> context.SpawnContext:
    """A multiprocessing context for helpers that call become_helper_process first (pass it to a pool):
    a signal sent before they do reaches them blocked, not as a KeyboardInterrupt while they import."""
    return _HelperSpawnContext()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


_forked_by_main_thread = False
_hooked = False


def helpers_die_with_this_process() -> None:
    """From now on, every process this one forks from its main thread dies when it does.

    Only forks of the main thread: the kernel's parent-death signal follows the thread that
    forked, which for the main thread lives as long as the process.
    """
    global _hooked
    if _hooked:
        return
    os.register_at_fork(before=_note_forking_thread, after_in_child=_die_with_parent_if_main_forked)
    _hooked = True


def _note_forking_thread() -> None:
    global _forked_by_main_thread
    _forked_by_main_thread = threading.current_thread() is threading.main_thread()


def _die_with_parent_if_main_forked() -> None:
    if _forked_by_main_thread:
        die_with_parent()
