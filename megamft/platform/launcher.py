"""`megamft launch`: torchrun whose agent passes preemption signals to its workers and waits for them.

Stock torchrun, given SIGTERM, forwards it to each worker's process group,
SIGKILLs the workers after ``--shutdown-timeout`` (30 s by default, less than a
large checkpoint takes to write) and exits non-zero; SIGUSR1 it does not handle
at all and dies of it, leaving its workers to train on unsupervised.

Here the agent keeps torchrun's handling of SIGINT, SIGHUP and SIGQUIT (stop
now), and sends SIGTERM and SIGUSR1 on to its worker processes alone, not to
their process groups. Each worker finishes its step, saves and exits 0; the
agent sees its workers succeed and exits 0 as well, however long the save
takes: the scheduler's grace time is the only limit. Every torchrun option
works as with torchrun itself.
"""

from __future__ import annotations

import os
import signal
import sys

import psutil

from megamft.errors import UserError
from megamft.platform.signals import PREEMPTION_SIGNALS

STOP_NOW_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""The signals torchrun's agent keeps: it forwards them and shuts its workers down."""


class LaunchError(UserError, ValueError):
    """An option megamft launch cannot honour."""


def _pass_to_workers(signum: int, frame) -> None:
    workers = psutil.Process().children(recursive=False)
    if not workers:  # nothing started yet, so nothing to save: stop as torchrun would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for worker in workers:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass  # it ended meanwhile


def torchrun_arguments(argv: list[str]) -> list[str]:
    """torchrun's arguments with the agent's own signal list; refuses a list that takes back ours."""
    for arg in argv:
        if arg in ("-m", "--module") or arg.endswith(".py"):
            break  # the program's own arguments start here
        if arg.split("=")[0] in ("--signals-to-handle", "--signals_to_handle"):
            raise LaunchError(
                f"megamft launch: {arg!r}: the agent's signals are set by megamft launch "
                f"({STOP_NOW_SIGNALS}; SIGTERM and SIGUSR1 go to the workers); use torchrun itself to choose")
    return ["--signals-to-handle", STOP_NOW_SIGNALS, *argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        arguments = torchrun_arguments(argv)
    except LaunchError as err:
        print(err, file=sys.stderr)
        return 2
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _pass_to_workers)
    from torch.distributed import run as torchrun  # imported here: the parsing above must stay quick

    torchrun.main(arguments)  # raises (torchrun's own error report) when a worker fails
    return 0
