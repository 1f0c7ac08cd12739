"""Run `python -m MODULE ARGS` in a process forked from the test fork server, as a fresh one would run.

    done = run_module("megamft", ["train", "train.train_steps=2"], env=env, cwd=ROOT, timeout=300)

The process starts from the server of megamft.testing.distributed, which has imported torch,
megatron-core and megamft once, so a command does not spend ~8 s importing them again. Before the
module runs, the process gets a session of its own, `env` as its whole environment, `cwd`, stdin
from /dev/null and its output in files; the module runs as ``__main__`` with `args` as its
arguments, and the exit handlers a fresh interpreter runs at its end run too
(megamft.testing.forkserver). What it cannot repeat: the warnings those libraries print while
they import (imported already), and interpreter options (``-W``, ``-X``).
MEGAMFT_TEST_FORKSERVER=0 runs a fresh interpreter instead.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megamft.testing import forkserver


def run_module(
    module: str,
    args: list[str],
    env: dict[str, str],
    cwd: str | Path,
    timeout: float,
    merge_output: bool = False,
) -> subprocess.CompletedProcess:
    """The finished command: its exit status (negative: killed by that signal), stdout and stderr
    (`merge_output`: both in stderr, in the order written)."""
    command = [sys.executable, "-m", module, *args]
    context = forkserver.context()
    if context is None:
        if not merge_output:
            return subprocess.run(
                command,
                env=env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        done = subprocess.run(
            command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        return subprocess.CompletedProcess(command, done.returncode, "", done.stdout)
    with tempfile.TemporaryDirectory(prefix="megamft-command-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = context.Process(
            target=_forked_main,
            daemon=False,
            args=(module, args, env, str(cwd), str(out), str(err if not merge_output else out)),
        )
        process.start()
        try:
            process.join(timeout)
            if process.exitcode is None:
                raise subprocess.TimeoutExpired(
                    command,
                    timeout,
                    out.read_text(errors="replace"),
                    err.read_text(errors="replace") if err.exists() else "",
                )
        finally:
            _kill_session(process.pid)
            process.join()
        stdout = out.read_text(errors="replace") if out.exists() else ""
        stderr = err.read_text(errors="replace") if err.exists() else ""
        if merge_output:
            stdout, stderr = "", stdout
        return subprocess.CompletedProcess(command, process.exitcode, stdout, stderr)


def _kill_session(pid: int) -> None:
    """What the command left running in its session (helpers it started) goes with it."""
    for _ in range(50):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.01)


def _forked_main(
    module: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str
) -> None:
    forkserver.become_fresh_process(env, out, err, cwd)
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback, status 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        forkserver.run_exit_handlers()
    os._exit(code)
