"""A user's mistakes as data: the command as typed, the one line it must answer, what must survive.

    Mistake("unknown config key", ["megamft", "check", "--world-size", "1", "train.stpes=3"],
            message=r"unknown key 'train.stpes'")

`run` makes the damaged inputs (`setup`), records the files that must survive, runs
the command as a user would (a fresh process, cwd = the repository, MEGAMFT_DEBUG
unset), and checks: the exit code, no Python traceback, one line on stderr (`lines`
where several problems are listed, one each) whose first matches `message`, and every
`keep` path unchanged. ``{tmp}`` in an argument is the
test's temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


def _fingerprint(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(mistake: Mistake, tmp: Path) -> subprocess.CompletedProcess:
    """Make the mistake and check the answer; return the finished process for further checks."""
    if mistake.setup is not None:
        mistake.setup(tmp)
    kept = {name: _fingerprint(tmp / name) for name in mistake.keep}
    program, *rest = mistake.argv
    argv = [sys.executable, *PROGRAMS[program], *(a.replace("{tmp}", str(tmp)) for a in rest)]
    env = {k: v for k, v in os.environ.items() if k not in ("MEGAMFT_DEBUG", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run(argv, cwd=ROOT, env={**env, **mistake.env}, capture_output=True, text=True,
                          timeout=mistake.timeout)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == mistake.exit_code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == mistake.lines, f"expected {mistake.lines} line(s) on stderr, got {len(lines)}:\n" + \
        "\n".join(lines[-20:])
    assert re.search(mistake.message, lines[0]), (mistake.message, lines[0])
    for name, before in kept.items():
        assert _fingerprint(tmp / name) == before, f"{name} changed"
    return done
