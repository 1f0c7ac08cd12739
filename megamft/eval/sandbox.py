"""Run untrusted generated code in a separate, limited, isolated process.

Every program runs in a fresh process with: a wall-clock time limit, after which its
whole process group is killed; resource limits (address space, CPU seconds, file size,
no core files, processes); its own temporary working directory, deleted afterwards; an
environment holding only PATH, LANG, HOME and TMPDIR (nothing inherited).

Where the machine allows it (running as root with util-linux `unshare` and `setpriv`),
it also runs in new PID, network, mount, IPC and UTS namespaces as the unprivileged
user `nobody`, with the world-writable folders (/tmp, /var/tmp, /dev/shm, /run/lock)
read-only except its working directory: no network, no process outlives the program
(the kernel kills a PID namespace when its first process ends), no writes outside the
working directory. `Sandbox.isolation` lists what was applied.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from megamft.eval import EvaluationError
from megamft.eval.languages import Language, find_tools, language

NOBODY = 65534
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

# Runs as root inside the new namespaces: make the world-writable folders read-only (this
# namespace only), keep the working directory ($1) writable, then become `nobody` and run the rest.
_NAMESPACE_SCRIPT = """set -e
mount --make-rprivate /
for d in {folders}; do
  if [ -d "$d" ]; then mount --bind "$d" "$d"; mount -o remount,bind,ro "$d"; fi
done
mount --bind "$1" "$1"; mount -o remount,bind,rw "$1"
cd "$1"
shift
exec setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all \
  -- "$@"
""".format(folders=" ".join(WORLD_WRITABLE), uid=NOBODY)


_PYTHON_NEEDS_MB = (
    64  # address space Python 3.11 maps to start (measured ~30 MB; headroom for imports)
)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    """Wall-clock seconds before the process group is killed."""
    memory_bytes: int = 2 * 2**30
    """Address-space limit (RLIMIT_AS) of every process."""
    file_bytes: int = 64 * 2**20
    """Largest file a program may write (RLIMIT_FSIZE)."""
    processes: int = 256
    """Processes of the sandbox user (RLIMIT_NPROC; counts all sandboxes running as `nobody`)."""


@dataclass
class Outcome:
    status: str  # passed | failed | timeout
    returncode: int | None
    seconds: float
    stderr_tail: str


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    try:
        probe = subprocess.run(
            [
                "unshare",
                "--pid",
                "--net",
                "--mount",
                "--ipc",
                "--uts",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                "mount --make-rprivate / && setpriv --reuid=65534 --regid=65534 "
                "--clear-groups true",
            ],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class Sandbox:
    """Runs programs under `limits`; `isolation='auto'` uses namespaces where they work, 'basic' never."""

    def __init__(
        self, limits: Limits = Limits(), isolation: str = "auto", python: str | None = None
    ):
        if isolation not in ("auto", "basic"):
            raise EvaluationError(f"isolation must be 'auto' or 'basic', not {isolation!r}")
        self.limits = limits
        self.namespaces = isolation == "auto" and _namespaces_work()
        self.drop_user = os.geteuid() == 0
        measures = [
            "separate process",
            "time limit + process-group kill",
            "rlimits (AS, CPU, FSIZE, CORE, NPROC)",
            "own temporary working directory",
            "clean environment",
        ]
        if self.namespaces:
            measures += [
                "PID/network/mount/IPC/UTS namespaces",
                f"user nobody ({NOBODY})",
                "world-writable folders read-only",
            ]
        elif self.drop_user:
            measures += [f"user nobody ({NOBODY})"]
        self._tools: dict[str, dict[str, str]] = {"python": {}}
        self._running: set[int] = set()  # process groups of the programs running now
        self._refusing = False
        self._guard = threading.Lock()
        self.python, version = self._usable_python(
            [python] if python else [sys.executable, "/usr/bin/python3"]
        )
        self.isolation = measures + [f"interpreter {self.python} (Python {version})"]

    def prepare(self, name: str, where: str = "the problems") -> None:
        """Find a language's toolchain now (MissingToolchain naming what is absent and `where`)."""
        lang = language(name)
        if lang.name not in self._tools:
            self._tools[lang.name] = find_tools(lang, where)

    def _usable_python(self, candidates: list[str]) -> str:
        """The first interpreter the sandbox user can run (a venv under /root is out of nobody's reach)."""
        for candidate in candidates:
            self.python = candidate
            probe = (
                self.run("import sys; sys.stderr.write(sys.version.split()[0])")
                if os.path.exists(candidate)
                else None
            )
            if probe and probe.status == "passed":
                return candidate, probe.stderr_tail
            if probe and self._starts_with_room(candidate):
                raise EvaluationError(
                    f"{candidate} does not start within the sandbox's limits (--memory-mb "
                    f"{self.limits.memory_bytes // 2**20}, --timeout {self.limits.timeout_s:g}): raise them; Python "
                    f"needs about {_PYTHON_NEEDS_MB} MB of address space and a second to start"
                )
        raise EvaluationError(
            f"the sandbox user cannot run any of {candidates}; give a Python it can run "
            "(--sandbox-python)"
        )

    def _starts_with_room(self, candidate: str) -> bool:
        """Whether `candidate` starts under generous limits (then the configured ones were too small)."""
        configured = self.limits
        self.limits = Limits(
            timeout_s=30.0,
            memory_bytes=4 * 2**30,
            file_bytes=configured.file_bytes,
            processes=configured.processes,
        )
        try:
            return self.run("pass").status == "passed"
        finally:
            self.limits = configured

    def _limit(self, lang: Language) -> None:
        """In the child before exec: resource limits, inherited by everything it starts."""
        cpu = int(self.limits.timeout_s) + 1
        memory = resource.RLIMIT_AS if lang.limit_address_space else resource.RLIMIT_DATA
        for which, value in (
            (memory, self.limits.memory_bytes),
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_FSIZE, self.limits.file_bytes),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, self.limits.processes),
        ):
            resource.setrlimit(which, (value, value))
        if self.drop_user and not self.namespaces:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

    def _command(self, workdir: str, lang: Language, program: str) -> list[str]:
        if lang.name == "python":
            command = [self.python, "-I", "-B", lang.file_name(program)]
        else:
            command = ["/bin/sh", "-c", lang.script(self._tools[lang.name], program)]
        if self.namespaces:
            return [
                "unshare",
                "--pid",
                "--net",
                "--mount",
                "--ipc",
                "--uts",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                _NAMESPACE_SCRIPT,
                "sandbox",
                workdir,
                *command,
            ]
        return command

    def _environment(self, workdir: str, lang: Language) -> dict:
        folders = dict.fromkeys(
            [*(os.path.dirname(t) for t in self._tools[lang.name].values()), "/usr/bin", "/bin"]
        )
        return {"PATH": ":".join(folders), "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}

    def run(self, program: str, language_name: str = "python") -> Outcome:
        """Run one program of a language (its toolchain found by `prepare`, or now)."""
        lang = language(language_name)
        self.prepare(lang.name)
        workdir = tempfile.mkdtemp(prefix="megamft-sandbox-")
        try:
            with open(os.path.join(workdir, lang.file_name(program)), "w", encoding="utf-8") as f:
                f.write(program)
            if self.drop_user:
                os.chown(workdir, NOBODY, NOBODY)
            with (
                tempfile.TemporaryFile() as stderr
            ):  # a file, not a pipe: a stray child cannot hold it open
                return self._wait(workdir, lang, program, stderr)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @contextlib.contextmanager
    def refusing_new(self):
        """Kill every program running now and start none until the block ends (an evaluation interrupted
        by Ctrl-C: the programs run in sessions of their own, which the terminal's signal does not reach)."""
        with self._guard:
            self._refusing = True
            running = list(self._running)
        for group in running:
            _kill_group(group)
        try:
            yield
        finally:
            with self._guard:
                self._refusing = False

    def _wait(self, workdir: str, lang: Language, program: str, stderr) -> Outcome:
        start = time.monotonic()
        with self._guard:
            if self._refusing:
                return Outcome("failed", None, 0.0, "not run: the evaluation was interrupted")
            try:
                process = subprocess.Popen(
                    self._command(workdir, lang, program),
                    cwd=workdir,
                    env=self._environment(workdir, lang),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                    preexec_fn=lambda: self._limit(lang),
                )
            except OSError as err:  # e.g. the sandbox user may not run this interpreter
                return Outcome("failed", None, time.monotonic() - start, f"could not start: {err}")
            self._running.add(process.pid)
        try:
            returncode = process.wait(timeout=self.limits.timeout_s)
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            returncode, status = None, "timeout"
        finally:
            _kill_group(process.pid)  # whatever it started in its group goes too
            process.wait()
            with self._guard:
                self._running.discard(process.pid)
        seconds = time.monotonic() - start
        stderr.seek(0)
        tail = (
            stderr.read()[-2000:].decode("utf-8", "replace").replace(workdir + "/", "")
        )  # same text every run
        if status == "passed" and lang.failure_text and lang.failure_text in tail:
            status = "failed"
        return Outcome(status, returncode, seconds, tail)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
