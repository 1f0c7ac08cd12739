"""A user's mistakes as data: the command as typed, the one line it must answer, what must survive.

    Mistake("unknown config key", ["megamft", "check", "--world-size", "1", "train.stpes=3"],
            message=r"unknown key 'train.stpes'")

`run` makes the damaged inputs (`setup`), records the files that must survive, runs
the command as a user would (a fresh process, cwd = the repository, MEGAMFT_DEBUG
unset), and checks: the exit code, no Python traceback, one line on stderr (`lines`
where several problems are listed, one each) whose first matches `message`, and every
`keep` path unchanged. ``{tmp}`` in an argument is the
test's temporary folder.

Disks and ports are real, not mocked: `read_only` folders (under ``{tmp}``) are bind-mounted
read-only and `full` ones are full 64 KiB tmpfs, both in a mount namespace of the command's
own (``unshare``; needs root or user namespaces: skipped where neither works; as root,
permissions alone would not stop a write); `busy_port` makes ``{port}`` a port another
socket listens on while the command runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from megamft.testing.forked_command import run_module

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {  # what each command runs, as its console script would
    "megamft": ["-m", "megamft"],
    "megamft-preprocess": ["-m", "megamft.data.preprocess_cli"],
    "megamft-convert": ["-m", "megamft.checkpoint.convert_cli"],
}


@dataclass(frozen=True)
class Mistake:
    """One mistake: `argv` starts with a program of PROGRAMS; `message` is a regex for the one stderr line."""

    name: str
    argv: list[str]
    message: str
    exit_code: int = 2
    setup: Callable[[Path], None] | None = None
    keep: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 300.0
    lines: int = 1  # several only where several problems are listed, one line each
    read_only: tuple[str, ...] = ()  # folders under {tmp} the command sees read-only
    full: tuple[str, ...] = ()  # folders under {tmp} the command sees as a full disk
    busy_port: bool = False  # {port}: a port another socket listens on


def _fingerprint(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(mistake: Mistake, tmp: Path) -> subprocess.CompletedProcess:
    """Make the mistake and check the answer; return the finished process for further checks."""
    if (mistake.read_only or mistake.full) and not can_mount():
        pytest.skip("needs a mount namespace of its own (root, or unprivileged user namespaces)")
    if mistake.setup is not None:
        mistake.setup(tmp)
    kept = {name: _fingerprint(tmp / name) for name in mistake.keep}
    with _listening() if mistake.busy_port else contextlib.nullcontext(None) as port:
        fill = {"{tmp}": str(tmp), "{port}": str(port)}
        program, *rest = mistake.argv
        args = [_filled(a, fill) for a in rest]
        env = {k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}
        env.update({k: _filled(v, fill) for k, v in mistake.env.items()})
        if mistake.read_only or mistake.full:
            argv = in_mount_namespace(
                [sys.executable, *PROGRAMS[program], *args],
                [tmp / f for f in mistake.read_only],
                [tmp / f for f in mistake.full],
            )
            done = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=mistake.timeout
            )
        else:  # the same command, forked from the test server that has imported torch and megatron-core
            done = run_module(PROGRAMS[program][1], args, env, ROOT, mistake.timeout)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == mistake.exit_code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == mistake.lines, (
        f"expected {mistake.lines} line(s) on stderr, got {len(lines)}:\n" + "\n".join(lines[-20:])
    )
    assert re.search(mistake.message, lines[0]), (mistake.message, lines[0])
    for (
        name,
        before,
    ) in kept.items():  # every file there was is there, unchanged (caches may be added)
        after = _fingerprint(tmp / name)
        assert {path: after.get(path) for path in before} == before, f"{name} changed"
    return done


_JOB_VARIABLES = (
    "MEGAMFT_DEBUG",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def _filled(text: str, fill: dict[str, str]) -> str:
    for name, value in fill.items():
        text = text.replace(name, value)
    return text


@contextlib.contextmanager
def _listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def in_mount_namespace(argv: list[str], read_only: list[Path], full: list[Path]) -> list[str]:
    """`argv` run in a mount namespace of its own where `read_only` folders are read-only and `full` ones
    are full tmpfs file systems; `argv` itself where there are none."""
    if not (read_only or full):
        return argv
    steps = []
    for folder in read_only:
        folder.mkdir(parents=True, exist_ok=True)
        steps.append(f"mount --bind -o ro {shlex.quote(str(folder))} {shlex.quote(str(folder))}")
    for folder in full:
        folder.mkdir(parents=True, exist_ok=True)
        path = shlex.quote(str(folder))
        steps.append(f"mount -t tmpfs -o size=64k tmpfs {path}")
        steps.append(
            f"{{ dd if=/dev/zero of={path}/filler bs=4k 2>/dev/null; true; }}"
        )  # until no space is left
    script = " && ".join(steps) + ' && exec "$@"'
    namespaces = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    return ["unshare", *namespaces, "--propagation", "private", "sh", "-c", script, "sh", *argv]


@functools.cache
def can_mount() -> bool:
    """Whether this machine lets a process mount in a namespace of its own."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = in_mount_namespace(["true"], [Path(scratch) / "ro"], [Path(scratch) / "full"])
        try:
            return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
