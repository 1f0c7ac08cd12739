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

When a worker fails, the agent stops the others and megamft launch says in one line
which rank failed first and how, and exits with that worker's status (128 + the
signal's number for a signal); the worker said why itself (MEGAMFT_DEBUG=1 adds
torchrun's report and its agent's log).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import psutil

from megamft.entry_point import STOPPED_BY_ANOTHER_RANK_EXIT, UsageError, debugging, run_command
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
                f"{arg!r}: the agent's signals are set by megamft launch "
                f"({STOP_NOW_SIGNALS}; SIGTERM and SIGUSR1 go to the workers); use torchrun itself to choose"
            )
    return ["--signals-to-handle", STOP_NOW_SIGNALS, *argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("megamft launch", lambda: _launch(argv))


def _launch(argv: list[str]) -> int:
    arguments = torchrun_arguments(argv)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _pass_to_workers)
    from torch.distributed import DistNetworkError  # here: the parsing above must stay quick
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    parser = torchrun.get_args_parser()
    parser.error = _usage_error  # one line, as for every megamft command
    args = parser.parse_args(arguments)
    if not debugging():
        _quiet_agent_log()
    try:
        record(torchrun.run)(args)
    except ChildFailedError as err:
        if debugging():
            traceback.print_exc()  # torchrun's report
        return _report_failed_worker(err)
    except SignalException as err:  # SIGINT, SIGHUP or SIGQUIT: the agent stopped its workers
        if debugging():
            traceback.print_exc()
        print(
            f"megamft launch: stopped by {err.sigval.name}; every worker was stopped",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(err.sigval)
    except DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        raise LaunchError(
            f"port {args.master_port} is in use (another job on this node?): choose a free one "
            "with --master-port, or leave it out on a single node"
        ) from err
    return 0


def _quiet_agent_log() -> None:
    """The agent's log repeats, in many lines, what the workers and megamft launch's line say.

    Its modules' loggers set their own level (torch.distributed.elastic.utils.logging), so each is set here.
    """
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _usage_error(message: str):
    raise UsageError(f"{message} (see torchrun --help)")


def _report_failed_worker(err) -> int:
    """One line for torchrun's ChildFailedError; the exit status of the worker that failed first."""
    rank, failure = _root_failure(err.failures)
    code = failure.exitcode
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        how = f"was killed by {name}" + (
            " (out of memory? see dmesg)" if -code == signal.SIGKILL else ""
        )
        status = 128 - code
    else:
        how = {
            2: "stopped on a mistake in the input (exit code 2), reported in the workers' output",
            1: "failed (exit code 1); its traceback is in the workers' output",
        }.get(code, f"failed (exit code {code}); see the workers' output")
        status = code
    print(
        f"megamft launch: rank {rank} {how}; every worker was stopped", file=sys.stderr, flush=True
    )
    return status


def _root_failure(failures: dict) -> tuple:
    """The failure that stopped the job: the earliest (then lowest rank) of the workers that failed on their
    own, not of those stopped because another one had (exit 3, or the agent's SIGTERM)."""
    secondary = (STOPPED_BY_ANOTHER_RANK_EXIT, -signal.SIGTERM)
    own = {rank: f for rank, f in failures.items() if f.exitcode not in secondary} or failures
    rank = min(own, key=lambda r: (own[r].timestamp, r))
    return rank, own[rank]
