"""What every megamft command runs through: one line for a user's mistake, a traceback for a bug.

    def main(argv: list[str] | None = None) -> int:
        return run_command("megamft-convert", lambda: _convert(argv))

`run_command` runs the command's body and turns what it raises into an exit status:

- a ``UserError`` (megamft's own checks, and the library errors translated where
  the library is called: a tokenizer file that is not one, a truncated safetensors
  file, a port in use) prints ``PROG: message`` and exits 2; a config error with
  several problems lists them, one per line;
- an ``OSError`` of a known kind (no space, quota, read-only file system,
  permission, missing file) prints one line naming its path and what to do, exit 2;
- ``ReportedByAnotherRank`` (another rank failed first and said why) prints nothing
  and exits 3, so that a launcher can tell the rank that failed from those it stopped;
  under torchrun it first waits (up to a minute) for the agent to stop it, so that the
  agent sees the failing rank end first and names it;
- Ctrl-C prints ``PROG: interrupted`` and exits 130;
- anything else is megamft's bug: its traceback, then one closing line; exit 1.

``MEGAMFT_DEBUG=1`` adds the traceback to every case and lets library warnings through.
Without it, the warnings libraries print on import (megatron-core's "Apex is not
installed", deprecations) are silenced here, in the commands, not in the library.

Several ranks: an error found before the ranks connect (the config) is found alike by
every process of a node, so each node's local rank 0 reports it (``rank N:`` in front
where N is not 0); under torchrun the other workers wait for the agent to stop them,
so that local rank 0 is not stopped before it has said it. After the ranks connect,
the training loop decides which rank reports (megamft.platform.distributed.claim_report)
and marks the error with its rank.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
import warnings
from typing import Callable

from megamft.errors import ReportedByAnotherRank, UserError

DEBUG_VARIABLE = "MEGAMFT_DEBUG"
USER_ERROR_EXIT = 2
BUG_EXIT = 1
STOPPED_BY_ANOTHER_RANK_EXIT = 3
INTERRUPTED_EXIT = 130
AGENT_STOPS_WITHIN_S = 60.0
"""How long a worker that another rank's failure stopped waits for torchrun's agent to stop it."""

_IMPORT_NOISE = (  # UserWarnings libraries print while megamft imports or drives them
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"When using async grad allreduce it is recommended",
    r"full scope is deprecated",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to",
)

_DISK_ADVICE = "free space there or write elsewhere"
_OS_ADVICE = {
    errno.ENOSPC: f"no space left on the device; {_DISK_ADVICE}",
    errno.EDQUOT: f"disk quota exceeded; {_DISK_ADVICE}",
    errno.EROFS: "read-only file system; choose a folder on a writable one",
    errno.EACCES: "permission denied; choose a path this user may use, or change its permissions",
    errno.EPERM: "operation not permitted; choose a path this user may use, or change its permissions",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of this path is a file, not a folder; check the path",
    errno.EISDIR: "is a folder where a file is expected; check the path",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.EIO: "input/output error (a failing disk or network file system); check that file system",
    errno.ESTALE: "stale file handle (the network file system lost it); check the mount, then run again",
}
_NO_PATH_NEEDED = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EMFILE,
)  # said of the disk or the process, not a file


class UsageError(UserError):
    """A command line argparse cannot read."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line; the full usage is one ``--help`` away."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def debugging() -> bool:
    """MEGAMFT_DEBUG is set (to anything but 0): tracebacks for every error, library warnings shown."""
    return os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")


def quiet_library_warnings() -> None:
    """Silence deprecations and the import-time notices of the libraries beneath megamft."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for pattern in _IMPORT_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body (which imports what it needs) and return its exit status."""
    with warnings.catch_warnings():
        if not debugging():
            quiet_library_warnings()
        try:
            return body()
        except UserError as err:
            return _report_user_error(prog, err)
        except ReportedByAnotherRank:
            if debugging():
                traceback.print_exc()
            if _under_torchrun():
                time.sleep(AGENT_STOPS_WITHIN_S)
            return STOPPED_BY_ANOTHER_RANK_EXIT
        except KeyboardInterrupt:
            if debugging():
                traceback.print_exc()
            if _env_local_rank() == 0:  # Ctrl-C reaches every process of a node alike
                _say(prog, "interrupted")
            return INTERRUPTED_EXIT
        except OSError as err:
            line = os_error_line(err)
            if line is None:
                return _report_bug(prog, err)
            if debugging():
                traceback.print_exc()
            _say(prog, _rank_prefix(_env_rank()) + line)
            return USER_ERROR_EXIT
        except Exception as err:  # noqa: BLE001 - every other error is megamft's own bug
            return _report_bug(prog, err)


def os_error_line(err: OSError) -> str | None:
    """One line for the OSErrors a user's disk or paths provoke, naming the path; None for any other."""
    advice = _OS_ADVICE.get(err.errno)
    if advice is None:
        return None
    path = (
        err.filename2
        if err.filename2 is not None and err.errno in (errno.ENOSPC, errno.EDQUOT)
        else err.filename
    )
    if path is None:
        return advice if err.errno in _NO_PATH_NEEDED else None
    return f"{os.fsdecode(path)}: {advice}"


def _report_user_error(prog: str, err: UserError) -> int:
    if debugging():
        traceback.print_exc()
    if err.rank is None and _env_local_rank() != 0:  # found alike by every process of this node
        if not _under_torchrun():
            return USER_ERROR_EXIT  # its local rank 0 says it
        # torchrun's agent stops every worker once one has ended: let local rank 0 end first, on the same
        # error, and say it (else the agent could stop it before it does); still here, say it here
        time.sleep(AGENT_STOPS_WITHIN_S)
    _say(prog, _rank_prefix(_env_rank() if err.rank is None else err.rank) + str(err))
    return USER_ERROR_EXIT


def _report_bug(prog: str, err: BaseException) -> int:
    traceback.print_exc()
    _say(
        prog,
        f"{_rank_prefix(_env_rank())}unexpected {type(err).__name__}: this is a bug in megamft, not a "
        "mistake in your input; please report it with the traceback above",
    )
    return BUG_EXIT


def _say(prog: str, line: str) -> None:
    print(f"{prog}: {line}", file=sys.stderr, flush=True)


def _rank_prefix(rank: int) -> str:
    return f"rank {rank}: " if rank else ""


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
