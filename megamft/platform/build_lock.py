"""One builder at a time in a build folder; a lock left by a killed builder is taken over.

    with BuildLock(folder):        # waits while a live builder holds the folder
        ...build into folder...

The lock is the file ``megamft-build.lock`` in the folder, holding its owner:
host, pid namespace, pid, the pid's start time (from /proc) and when the lock
was taken. It is written whole under a private name and hard-linked into place
(the link fails while another process holds the lock), so a reader never sees
half an owner. While a live builder holds it, ``acquire`` waits and logs a
progress line every ``progress_every_s`` seconds. A lock is stale, and removed
with a warning, when

- its owner ran on this host (same hostname and pid namespace) and that process
  is gone: the pid is not running, is a zombie, or belongs to a process started
  since (a reused pid); or
- it was taken more than ``stale_after_s`` seconds ago (default ``STALE_AFTER_S``,
  30 minutes, several times a build's length): a builder on another host
  sharing the folder cannot be checked from here, and a builder stuck that long
  is taken as dead.

Files a killed build leaves beside the lock (torch's build baton) are the
caller's to clear once it holds the lock: ``stale_owners`` names whom the lock
was taken over from.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_NAME = "megamft-build.lock"
STALE_AFTER_S = 1800.0


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks after boot) of a Linux process; None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (command) ": field 3 (state) onwards
    return fields[0], fields[19]


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class BuildOwner:
    """Who holds a build lock."""

    host: str
    pid_namespace: str | None  # two containers may share a hostname but not their pids
    pid: int
    pid_start: str | None  # tells a reused pid from the builder's own process
    started: float  # time.time() when the lock was taken
    token: str  # unique per acquisition

    @classmethod
    def me(cls) -> "BuildOwner":
        stat = _proc_stat(os.getpid())
        return cls(
            socket.gethostname(),
            _pid_namespace(),
            os.getpid(),
            stat[1] if stat else None,
            time.time(),
            uuid.uuid4().hex,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, lock taken {time.time() - self.started:.0f} s ago"

    def gone(self) -> str | None:
        """Why this owner's process is known to be gone (None: running, or not checkable from here)."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:
            pass  # another user's live process
        stat = _proc_stat(self.pid)
        if stat is not None and stat[0] == "Z":
            return "its process has exited"
        if stat is not None and self.pid_start is not None and stat[1] != self.pid_start:
            return "its pid now belongs to another process"
        return None


def _read(path: Path) -> tuple[BuildOwner | None, os.stat_result] | None:
    """(owner or None when unreadable, the file's stat); None when there is no such file."""
    try:
        info = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return BuildOwner(**json.loads(text)), info
    except (ValueError, TypeError):
        return None, info


class BuildLock:
    """Exclusive use of a build folder by one process on any host that shares it (see the module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        stale_after_s: float = STALE_AFTER_S,
        poll_s: float = 1.0,
        progress_every_s: float = 30.0,
    ):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.progress_every_s = progress_every_s
        self.owner: BuildOwner | None = None
        self.stale_owners: list[
            str
        ] = []  # who held the stale locks taken over, and why they were stale

    def acquire(self) -> "BuildLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = BuildOwner.me()
        mine = self.folder / f"{LOCK_NAME}.{me.token}"
        mine.write_text(json.dumps(asdict(me)))
        began = last_note = time.monotonic()
        try:
            while True:
                try:
                    os.link(mine, self.path)
                    self.owner = me
                    return self
                except FileExistsError:
                    pass
                held = _read(self.path)
                if held is None:
                    continue  # released meanwhile
                reason = self._stale(*held)
                if reason is not None:
                    self._take_over(held, reason, me)
                    continue
                if time.monotonic() - last_note >= self.progress_every_s:
                    last_note = time.monotonic()
                    log.info(
                        "waiting for the build in %s by %s (waited %.0f s; a lock older than %.0f min is "
                        "taken over)",
                        self.folder,
                        held[0].describe() if held[0] else "an unknown process",
                        last_note - began,
                        self.stale_after_s / 60,
                    )
                time.sleep(self.poll_s)
        finally:
            mine.unlink(missing_ok=True)

    def _stale(self, owner: BuildOwner | None, info: os.stat_result) -> str | None:
        """Why a held lock is stale; None when its builder may be at work."""
        if owner is not None:
            gone = owner.gone()
            if gone is not None:
                return f"{gone} ({owner.describe()})"
        taken = owner.started if owner is not None else info.st_mtime
        age = time.time() - taken
        if age > self.stale_after_s:
            who = owner.describe() if owner is not None else "an unreadable lock"
            return f"it was taken {age / 60:.1f} min ago, over the {self.stale_after_s / 60:.1f} min limit ({who})"
        return None

    def _take_over(
        self, held: tuple[BuildOwner | None, os.stat_result], reason: str, me: BuildOwner
    ) -> None:
        """Remove the stale lock judged in `held`, unless another process replaced it meanwhile."""
        aside = self.folder / f"{LOCK_NAME}.stale.{me.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another waiter removed it first
        moved = _read(aside)
        if moved is None or moved[0] != held[0] or moved[1].st_ino != held[1].st_ino:
            # not the lock judged stale but another waiter's fresh one: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            self.stale_owners.append(reason)
            log.warning("%s: removed a stale build lock: %s", self.folder, reason)
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.owner is None:
            return
        held = _read(self.path)
        if held is not None and held[0] is not None and held[0].token == self.owner.token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning(
                "%s: the build lock was taken over by another process while this one built "
                "(it held it over %.0f min)",
                self.folder,
                self.stale_after_s / 60,
            )
        self.owner = None

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
