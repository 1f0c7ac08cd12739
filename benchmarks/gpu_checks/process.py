"""Child processes, each the leader of its own process group, killed (whole group) on timeout or interrupt."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: commands run here
ENTRY_SCRIPT = (
    Path(__file__).resolve().parents[1] / "gpu_check.py"
)  # children started as `gpu_check.py _probe` etc.

_PORT_LOCK = threading.Lock()
_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    with _PORT_LOCK:
        for _ in range(50):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(port)
                return port
        return port


_PROCS: set[subprocess.Popen] = set()
_PROCS_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_children() -> None:
    with _PROCS_LOCK:
        procs = list(_PROCS)
    for proc in procs:
        _kill_group(proc)


@dataclass
class CmdResult:
    command: list
    rc: int | None
    seconds: float
    timed_out: bool
    log: Path
    output: str = ""

    def brief(self) -> dict:
        return {
            "command": " ".join(map(str, self.command)),
            "rc": self.rc,
            "seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
            "log": str(self.log),
        }


def run_cmd(cmd: list, log: Path, timeout: float, env: dict | None = None) -> CmdResult:
    """Run in its own process group, output to `log`; killed (whole group) after `timeout` s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    timed_out = False
    with open(log, "w") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        if timeout <= 0:
            return CmdResult(cmd, None, 0.0, True, log, "not started: no time left")
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        with _PROCS_LOCK:
            _PROCS.add(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc)
            rc = proc.wait()
        finally:
            with _PROCS_LOCK:
                _PROCS.discard(proc)
            _kill_group(proc)  # stray children (checkpoint writers, compile workers)
    output = log.read_text(errors="replace")
    return CmdResult(cmd, rc, time.monotonic() - began, timed_out, log, output)


def tail(text: str, chars: int = 2500) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def last_error(output: str) -> str:
    """The most telling line of a failed run's output."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:|megamft: )", line) and "Warning" not in line:
            return line[-400:]
    return lines[-1][-400:] if lines else "(no output)"


def float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")
