"""Test processes forked from a server that has imported torch, megatron-core and megamft once.

Starting a fresh interpreter costs ~8 s of imports; a process forked from the server
(multiprocessing's forkserver with these modules preloaded) starts in a fraction of a
second. Nothing is initialized before the fork, and `become_fresh_process` gives the
forked process what a fresh one would have: its own session, environment, working folder,
standard streams and thread count; `run_exit_handlers` runs at its end what an
interpreter runs at exit. MEGAMFT_TEST_FORKSERVER=0 turns the server off (`context`
is then None and callers start fresh interpreters).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import sys

VARIABLE = "MEGAMFT_TEST_FORKSERVER"
PRELOADED = ("torch", "megatron.core", "megamft.training.loop", "megamft.testing._worker")
"""What the server imports once: everything a test process spends its start-up importing."""


def context():
    """The multiprocessing context whose server holds the preloaded imports; None where it cannot be used."""
    if (
        os.environ.get(VARIABLE, "1") == "0"
        or "forkserver" not in multiprocessing.get_all_start_methods()
    ):
        return None
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(list(PRELOADED))
    return forkserver


def become_fresh_process(
    env: dict[str, str], stdout: str, stderr: str, cwd: str | None = None
) -> None:
    """In a forked process: a session of its own (so a kill of its group reaches what it starts), stdin from
    /dev/null, output appended to the given files, `env` as its whole environment, `cwd`, and the thread
    count OMP_NUM_THREADS asks for (the server read that variable before the fork)."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def run_exit_handlers() -> None:
    """What an interpreter runs at exit (a forked process ends without it): exit handlers, flushed output."""
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
