"""One writer per folder, on one host or many: a lock file naming its owner, kept fresh by a heartbeat.

``with FolderLock(folder, "training run"):`` creates ``<folder>/.megamft.lock``
naming its owner (host, pid, start time, command, and the scheduler's job:
SLURM_JOB_ID and SLURM_RESTART_COUNT, TORCHELASTIC_RUN_ID and
TORCHELASTIC_RESTART_COUNT where set). While it is held, a daemon thread
rewrites it every ``HEARTBEAT_INTERVAL_S`` with the time of its heartbeat. Every
write goes to a private file first and is renamed into place, so a reader on
any host sees the previous lock or the new one, never half of one.

A lock found in place is stale, and taken over (``takeover`` says whose and
why, for a warning), when

- it cannot be read (not a lock megamft wrote whole);
- its SLURM job is this job at another restart count: a requeued job keeps
  its id, so its earlier run has ended, on whatever node it ran (likewise a
  torchelastic run id at another restart);
- it was taken on this host by a process that is gone;
- its heartbeat is older than ``STALE_AFTER_S``: its holder was killed
  (SIGKILL, the OOM killer, an NCCL watchdog abort) or its node failed.

Any other lock is live, and refused with its owner named.

Time limits. The heartbeat is written every 30 s and a lock is stale after
10 minutes without one: 20 missed heartbeats. The margin covers clocks that
disagree between hosts (the heartbeat is the holder's clock, its age the
reader's; a heartbeat from the future counts as fresh), NFS caching (a reader
may see a lock up to a minute old: acregmax and the lookup cache default to
60 s) and a holder slowed by a loaded file system. A requeued SLURM job does not
wait for it (its restart count tells), nor does a restart on the same host
(its pid tells); a new job after a hard kill on another host waits up to 10
minutes, or deletes the lock. A holder stopped for longer than that (a job
suspended with SIGSTOP) can lose its lock: its heartbeat thread then finds
another owner's lock, stops, and logs an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from megamft.platform.output_folder import DestinationError

LOCK_NAME = ".megamft.lock"
HEARTBEAT_INTERVAL_S = 30.0
STALE_AFTER_S = 600.0

log = logging.getLogger("megamft")


@dataclass
class LockOwner:
    """Who holds a lock (the lock file's content)."""

    host: str
    pid: int
    started: float
    command: str
    heartbeat: float | None = None  # None: written by a megamft without heartbeats
    token: str = ""  # tells this holding apart from a later one by the same pid
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0
    elastic_run_id: str | None = None
    elastic_restart_count: int = 0

    @classmethod
    def this_process(cls, command: str) -> "LockOwner":
        env = os.environ
        now = time.time()
        elastic = env.get("TORCHELASTIC_RUN_ID")
        return cls(
            socket.gethostname(),
            os.getpid(),
            now,
            command,
            now,
            uuid.uuid4().hex,
            env.get("SLURM_JOB_ID") or None,
            int(env.get("SLURM_RESTART_COUNT") or 0),
            elastic if elastic not in (None, "", "none") else None,
            int(env.get("TORCHELASTIC_RESTART_COUNT") or 0),
        )

    @classmethod
    def from_json(cls, text: str) -> "LockOwner":
        """Raises ValueError, TypeError or KeyError for a lock that is not whole; unknown keys are ignored."""
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        text = f"pid {self.pid} on {self.host}, started {when} ({self.command})"
        if self.slurm_job_id:
            text += f", SLURM job {self.slurm_job_id} restart {self.slurm_restart_count}"
        if self.heartbeat is not None:
            text += f", last heartbeat {time.time() - self.heartbeat:.0f} s ago"
        return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(
    owner: LockOwner | None, me: LockOwner, stale_after: float = STALE_AFTER_S
) -> str | None:
    """Why `owner`'s lock may be taken over by `me`, or None when it is live (see the module docstring)."""
    if owner is None:
        return "the lock file cannot be read"
    if (
        owner.slurm_job_id
        and owner.slurm_job_id == me.slurm_job_id
        and owner.slurm_restart_count != me.slurm_restart_count
    ):
        return (
            f"SLURM job {owner.slurm_job_id} was requeued (restart {owner.slurm_restart_count} -> "
            f"{me.slurm_restart_count}): its earlier run has ended"
        )
    if (
        owner.elastic_run_id
        and owner.elastic_run_id == me.elastic_run_id
        and owner.elastic_restart_count != me.elastic_restart_count
    ):
        return (
            f"torchelastic run {owner.elastic_run_id} restarted its workers (restart "
            f"{owner.elastic_restart_count} -> {me.elastic_restart_count}): its earlier workers have ended"
        )
    if owner.host == me.host and not _alive(owner.pid):
        return f"its process {owner.pid} is no longer running on {owner.host}"
    if owner.heartbeat is not None and time.time() - owner.heartbeat > stale_after:
        return f"no heartbeat for {time.time() - owner.heartbeat:.0f} s (stale after {stale_after:.0f} s)"
    return None


class FolderLock:
    """One writer per folder: `with FolderLock(folder, "training"):` raises if another live process holds it.

    `takeover` names the stale owner taken over and why (None when the folder was free).
    `heartbeat_interval` and `stale_after` default to the module's documented limits.
    """

    def __init__(
        self,
        folder: str | Path,
        command: str,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        stale_after: float = STALE_AFTER_S,
    ):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.heartbeat_interval, self.stale_after = heartbeat_interval, stale_after
        self.takeover: str | None = None
        self._me: LockOwner | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def owner(self) -> LockOwner | None:
        """The lock's owner; None if there is no lock or it cannot be read."""
        try:
            return LockOwner.from_json(self.path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = LockOwner.this_process(self.command)
        # Written whole under a private name, then linked into place: link fails if the lock
        # exists, and a reader never sees a half-written lock.
        mine = self._private_file(me)
        mine.write_text(json.dumps(asdict(me)))
        try:
            for _ in range(3):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    self._refuse_or_clear_stale(me)
                    continue
                self._start_heartbeat(me)
                return self
        finally:
            mine.unlink(missing_ok=True)
        raise DestinationError(
            f"could not lock {self.folder}: another process keeps taking {self.path}"
        )

    def _private_file(self, me: LockOwner) -> Path:
        return self.folder / f"{LOCK_NAME}.{me.host}.{me.pid}.{me.token[:8]}"

    def _read_existing(self) -> tuple[bool, LockOwner | None]:
        """(whether a lock is there, its owner or None if unreadable); a failed read is retried once,
        as NFS may answer a read racing a rename with an error."""
        for attempt in range(2):
            try:
                return True, LockOwner.from_json(self.path.read_text())
            except FileNotFoundError:
                return False, None
            except (OSError, ValueError, TypeError, KeyError):
                if attempt == 0:
                    time.sleep(0.5)
        return True, None

    def _refuse_or_clear_stale(self, me: LockOwner) -> None:
        present, owner = self._read_existing()
        if not present:
            return  # released meanwhile: try again
        why = stale_reason(owner, me, self.stale_after)
        if why is None:
            raise DestinationError(
                f"{self.folder} is in use by another megamft {owner.command}: {owner.describe()}. Wait for it "
                f"to finish, or use another folder; if that process is gone, delete {self.path} (a lock whose "
                f"heartbeat is {self.stale_after:.0f} s old is taken over by itself)"
            )
        self.takeover = f"{owner.describe() if owner else self.path}: {why}"
        self.path.unlink(missing_ok=True)

    def _start_heartbeat(self, me: LockOwner) -> None:
        self._me = me
        self._stop.clear()
        self._beating = threading.Thread(
            target=self._beat, name=f"megamft lock heartbeat {self.folder}", daemon=True
        )  # never keeps the process alive
        self._beating.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                if not self._refresh():
                    return
            except OSError as err:  # a file system hiccup: the next beat tries again
                log.warning("%s: could not refresh the lock's heartbeat (%s)", self.path, err)

    def _refresh(self) -> bool:
        """Write a new heartbeat; False (and an error logged) if the lock is no longer ours."""
        current = self.owner()
        if current is None or current.token != self._me.token:
            log.error(
                "%s is no longer held by this process (now: %s): another run judged it stale; "
                "stop one of the two runs",
                self.path,
                current.describe() if current else "no lock",
            )
            return False
        beat = dataclasses.replace(self._me, heartbeat=time.time())
        private = self._private_file(beat)
        private.write_text(json.dumps(asdict(beat)))
        os.replace(private, self.path)
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this process's."""
        if self._me is None:
            return
        self._stop.set()
        if self._beating is not None and self._beating is not threading.current_thread():
            self._beating.join(timeout=10)
        current = self.owner()
        if current is not None and current.token == self._me.token:
            self.path.unlink(missing_ok=True)
        self._me, self._beating = None, None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
