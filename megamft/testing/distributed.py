"""Launch a function on N real processes (gloo), collect results, never hang.

    results = launch(my_module.my_function, world_size=2, kwargs={...})

Each rank is a new process with RANK/WORLD_SIZE/MASTER_* set, the CPU
emulation on, and OMP_NUM_THREADS=1 (so N ranks share a small machine
fairly), forked from the test fork server (megamft.testing.forkserver) as a
fresh interpreter would start. The function runs with the kwargs and its
return value (picklable) comes back per rank. If a rank raises, the others are killed and
`DistributedTestError` carries that rank's traceback; if the launch exceeds
its timeout, all ranks are killed and the error carries their output.
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from megamft.platform.distributed import free_port  # noqa: F401 (tests and benchmarks import it from here)
from megamft.testing import forkserver


class DistributedTestError(RuntimeError):
    """A rank failed or the launch timed out."""


class _ForkedRank:
    """A rank forked from the server, with the part of subprocess.Popen's interface launch uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self._process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def wait(self) -> int:
        self._process.join()
        return self._process.exitcode


def _forked_rank_main(workdir: str, env: dict[str, str], log: str) -> None:
    """A forked rank: started as a fresh interpreter would be, output to its log, then the worker."""
    forkserver.become_fresh_process(env, log, log)
    from megamft.testing import _worker

    try:
        code = _worker.main(Path(workdir))
    finally:
        forkserver.run_exit_handlers()
    sys.exit(code)


def _start_rank(workdir: Path, rank: int, world_size: int, port: int, log):
    env = _rank_env(rank, world_size, port)
    context = forkserver.context()
    if context is None:
        return subprocess.Popen(
            [sys.executable, "-m", "megamft.testing._worker", str(workdir)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = context.Process(
        target=_forked_rank_main, args=(str(workdir), env, log.name), daemon=False
    )
    process.start()
    return _ForkedRank(process)


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _kill_all(procs: list) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the rank and anything it spawned
            except ProcessLookupError:  # a forked rank killed before it made its own session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def launch(
    fn: Callable[..., Any], world_size: int, kwargs: dict | None = None, timeout: float = 300.0
) -> list[Any]:
    """Run fn(**kwargs) on `world_size` ranks; return the per-rank results."""
    workdir = Path(tempfile.mkdtemp(prefix="megamft-launch-"))
    job = {"file": inspect.getfile(fn), "qualname": fn.__qualname__, "kwargs": kwargs or {}}
    (workdir / "job.pkl").write_bytes(pickle.dumps(job))
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(world_size):
            logs.append(open(workdir / f"rank{rank}.log", "wb"))
            procs.append(_start_rank(workdir, rank, world_size, port, logs[-1]))
        _wait(procs, workdir, timeout)
        return [pickle.loads((workdir / f"result{r}.pkl").read_bytes()) for r in range(world_size)]
    finally:
        _kill_all(procs)
        for log in logs:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(procs: list, workdir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while any(proc.poll() is None for proc in procs):
            failed = [r for r, proc in enumerate(procs) if proc.poll() not in (None, 0)]
            if failed:
                raise DistributedTestError(_failure_report(failed[0], procs, workdir))
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- rank {r} ---\n{_tail(workdir / f'rank{r}.log', 1500)}"
                    for r in range(len(procs))
                )
                raise DistributedTestError(f"launch timed out after {timeout:.0f}s\n{logs}")
            time.sleep(0.05)
        failed = [r for r, proc in enumerate(procs) if proc.returncode != 0]
        if failed:
            raise DistributedTestError(_failure_report(failed[0], procs, workdir))
    finally:
        _kill_all(procs)


def _failure_report(rank: int, procs: list, workdir: Path) -> str:
    # Once one rank dies, the others fail with gloo connection errors; report the
    # failed rank whose traceback is not one of those, if any.
    failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    for candidate in failed:
        text = workdir / f"error{candidate}.txt"
        if text.exists() and "Connection closed by peer" not in text.read_text():
            rank = candidate
            break
    error_file = workdir / f"error{rank}.txt"
    detail = error_file.read_text() if error_file.exists() else _tail(workdir / f"rank{rank}.log")
    return f"rank {rank} of {len(procs)} failed (exit {procs[rank].returncode}):\n{detail}"
