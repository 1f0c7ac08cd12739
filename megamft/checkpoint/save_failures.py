"""What a save that fails or is interrupted leaves behind (nothing) and says (one line for a disk's refusal).

A checkpoint is written into ``iter_XXXXXXX.partial`` (dist_checkpoint). When the
save raises, or Ctrl-C interrupts it, rank 0 removes that folder, so the save
folder holds complete checkpoints only and `latest` still names the last one.
A full disk reaches megamft in several disguises: a plain OSError, one that
torch's distributed checkpointing wrapped in a CheckpointException (one per rank),
or a RuntimeError without an errno from torch.save's zip writer. Each becomes one
``SaveError`` naming the save folder and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megamft.errors import UserError


class SaveError(UserError, OSError):
    """A checkpoint the file system refused to hold (full, over quota, read-only, failing)."""


_SAVE_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space there, lower checkpoint.keep_last, or choose another "
    "checkpoint.save_dir",
    errno.EDQUOT: "disk quota exceeded; free space there, lower checkpoint.keep_last, or choose another "
    "checkpoint.save_dir",
    errno.EFBIG: "file too large for this file system or this user's limit (ulimit -f); choose another "
    "checkpoint.save_dir or raise the limit",
    errno.EROFS: "the file system became read-only (often after disk errors); check it, or choose another "
    "checkpoint.save_dir",
    errno.EIO: "input/output error (a failing disk or network file system); check that file system",
}


def disk_error(err: BaseException) -> OSError | None:
    """The file system's refusal (an OSError of _SAVE_ADVICE) behind a failed save: `err` itself, its cause,
    or one that torch's distributed checkpointing wrapped (CheckpointException holds each rank's exception)."""
    seen, todo = set(), [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _SAVE_ADVICE:
            return current
        if isinstance(current, CheckpointException):
            todo += [
                failure[0] if isinstance(failure, tuple) else failure
                for failure in current.failures.values()
            ]
        todo += [current.__cause__, current.__context__]
    return None


FULL_BELOW_BYTES = 2**20
"""A save folder's file system with less room than this after a failed save is taken as full."""


def _full_disk(save_dir: str | Path) -> OSError | None:
    """ENOSPC when save_dir's file system is full. torch.save's zip writer reports a write the disk
    refused as a RuntimeError without an errno ("unexpected pos ..."), so the disk itself is asked."""
    try:
        full = shutil.disk_usage(save_dir).free < FULL_BELOW_BYTES
    except OSError:
        return None
    return OSError(errno.ENOSPC, "No space left on device", str(save_dir)) if full else None


def _refusal(err: BaseException, save_dir: str | Path) -> OSError | None:
    """The file system's refusal behind `err`, if any (never for Ctrl-C); errors without an errno
    from the writers (RuntimeError, CheckpointException) count as a full disk when the disk is full."""
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    found = disk_error(err)
    if found is None and isinstance(err, (RuntimeError, CheckpointException)):
        found = _full_disk(save_dir)
    return found


@contextlib.contextmanager
def unfinished_removed(partials: list[Path], iteration: int, save_dir: str | Path):
    """A save that fails or is interrupted leaves no `.partial` folder (rank 0 removes them); one the
    file system refused (a full disk) is one error naming the save folder."""
    try:
        yield
    except BaseException as err:
        cause = _refusal(err, save_dir)  # asked before the clean-up frees room
        if torch.distributed.get_rank() == 0:
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
        if cause is None:
            raise
        advice = _SAVE_ADVICE[cause.errno]
        refused = SaveError(
            f"{save_dir}: {advice} (the checkpoint of step {iteration} was not written; the "
            "earlier ones are as they were)"
        )
        refused.errno = cause.errno
        raise refused from err
