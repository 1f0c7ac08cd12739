"""Folders megamft writes: who owns them, when they may be replaced, and how they are published.

Every command that writes a folder (training's save_dir, both conversions,
preprocessing) goes through here, so the same rules protect the user's work:

- ``check_destination`` refuses a destination that is or holds one of the
  command's inputs, and a non-empty destination
  that is not this kind of megamft output, unless ``overwrite``;
- ``FolderLock`` lets one process at a time write a folder, and tells a live
  owner (host, pid, start time) from a stale lock left by a killed run;
- ``publish`` moves a finished temporary sibling into place; the previous
  folder is kept aside until the new one is there, so a kill at any moment
  leaves one complete folder.

An output is recognised by ``OUTPUT_MARKER``, a small JSON file naming its kind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OUTPUT_MARKER = ".megamft-output.json"
TRAINING_OUTPUT = "training"  # a training run's checkpoint.save_dir
LOCK_NAME = ".megamft.lock"


class DestinationError(ValueError):
    """A destination folder that must not be written as asked."""


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def output_kind(folder: str | Path) -> str | None:
    """The kind of megamft output this folder holds, or None."""
    marker = Path(folder) / OUTPUT_MARKER
    try:
        return json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark_output(folder: str | Path, kind: str, **details) -> None:
    """Say what this folder is (written before it is published)."""
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, **details}, indent=2) + "\n")


def check_destination(destination: str | Path, kind: str, inputs=(), overwrite: bool = False,
                      option: str = "--out", recognise=None) -> None:
    """Refuse a destination that would destroy inputs or someone else's work.

    `inputs`: paths the command reads. `recognise(folder) -> bool` may accept
    outputs written before the marker existed. Raises DestinationError with
    what to do.
    """
    dest = _resolved(destination)
    for source in inputs:
        if source is None:
            continue
        if _inside(_resolved(source), dest):
            raise DestinationError(
                f"{option} {destination} holds the input {source}; replacing it would destroy that input. "
                f"Choose a new folder for {option}")
    if dest.exists() and not dest.is_dir():
        raise DestinationError(f"{option} {destination} is a file, not a folder; choose a folder")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    ours = output_kind(dest) == kind or (recognise is not None and recognise(dest))
    if ours or overwrite:
        return
    found = output_kind(dest)
    what = f"a megamft {found} output" if found else "files that megamft did not write"
    raise DestinationError(
        f"{option} {destination} is not empty and holds {what}, not a {kind} output; nothing was written. "
        f"Choose an empty or new folder, or pass --overwrite to write into it anyway")


def publish(partial: Path, final: Path) -> None:
    """Move a finished temporary folder into place, keeping any older copy aside until then."""
    aside = final.with_name(final.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(partial, final)
    shutil.rmtree(aside, ignore_errors=True)


def temporary_sibling(final: Path) -> Path:
    """An empty `<name>.partial` folder beside `final`, for writing before `publish`."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


@dataclass
class LockOwner:
    host: str
    pid: int
    started: float
    command: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {when} ({self.command})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """One writer per folder: `with FolderLock(folder, "training"):` raises if another live process holds it.

    A lock whose process is gone (same host, pid not alive) is stale: it is
    reported in `stale_owner` and taken over. A lock held from another host
    cannot be checked from here, so it is refused with its owner named.
    """

    def __init__(self, folder: str | Path, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.stale_owner: LockOwner | None = None
        self._held = False

    def owner(self) -> LockOwner | None:
        try:
            return LockOwner(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = LockOwner(socket.gethostname(), os.getpid(), time.time(), self.command)
        # Written whole under a private name, then linked into place: link fails if the lock
        # exists, and a reader never sees a half-written lock.
        mine = self.folder / f"{LOCK_NAME}.{me.host}.{me.pid}"
        mine.write_text(json.dumps(asdict(me)))
        try:
            for _ in range(2):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    self._refuse_or_clear_stale(me)
                    continue
                self._held = True
                return self
        finally:
            mine.unlink(missing_ok=True)
        raise DestinationError(f"could not lock {self.folder}: another process keeps taking {self.path}")

    def _refuse_or_clear_stale(self, me: LockOwner) -> None:
        owner = self.owner()
        if owner is not None and (owner.host != me.host or _alive(owner.pid)):
            raise DestinationError(
                f"{self.folder} is in use by another megamft {owner.command}: {owner.describe()}. "
                f"Wait for it to finish, or use another folder; if that process is gone, delete {self.path}")
        self.stale_owner = owner
        self.path.unlink(missing_ok=True)  # stale: its process is gone (or the lock is unreadable)

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
