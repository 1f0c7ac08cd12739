"""Kernel builds: stale build locks, complete-build folders, the once-per-node start-up, `megamft build-kernels`.

The builds here compile tests/kernel_jobs.py's tiny CPU extension with torch's
real cpp_extension.load (no CUDA toolkit or GPU on the test machines); torch's
lock is its real FileBaton (torch/utils/file_baton.py, created by
torch/utils/cpp_extension.py _jit_compile as <build_directory>/lock).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kernel_jobs
import pytest

from megamft.loss import kernel_cache
from megamft.platform.build_lock import LOCK_NAME, BuildLock, BuildOwner
from megamft.testing.distributed import launch

ROOT = Path(__file__).resolve().parents[1]


def _within(seconds: float, fn):
    """fn()'s result, failing the test if it takes longer (a build lock waited on forever)."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    return out["value"]


def _env(**extra) -> dict:
    """This environment, with this checkout's megamft importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _lock_of(folder: Path, **owner) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = {
        "host": "other-node",
        "pid_namespace": None,
        "pid": 12345,
        "pid_start": None,
        "started": time.time(),
        "token": "abc",
    } | owner
    (folder / LOCK_NAME).write_text(json.dumps(fields))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the build lock -------------------------------------------------------------------------------


def test_a_lock_older_than_the_limit_is_taken_over(tmp_path, caplog):
    _lock_of(tmp_path, started=time.time() - 7200)  # another host: only its age tells
    lock = _within(20, lambda: BuildLock(tmp_path, stale_after_s=1800, poll_s=0.05).acquire())
    assert len(lock.stale_owners) == 1 and "over the 30.0 min limit" in lock.stale_owners[0]
    assert "pid 12345 on other-node" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_young_lock_from_another_host_is_waited_for(tmp_path):
    _lock_of(tmp_path, started=time.time() - 60)
    acquired = threading.Event()
    threading.Thread(
        target=lambda: (BuildLock(tmp_path, poll_s=0.05).acquire(), acquired.set()), daemon=True
    ).start()
    assert not acquired.wait(1.0)  # not taken over
    (tmp_path / LOCK_NAME).unlink()  # its builder finishes
    assert acquired.wait(10)


@pytest.mark.parametrize("case", ["pid gone", "pid reused"])
def test_a_lock_whose_builder_on_this_host_is_gone_is_taken_over(tmp_path, caplog, case):
    me = BuildOwner.me()
    pid, pid_start = (_dead_pid(), me.pid_start) if case == "pid gone" else (os.getpid(), "1")
    _lock_of(tmp_path, host=me.host, pid_namespace=me.pid_namespace, pid=pid, pid_start=pid_start)
    lock = _within(
        20, lambda: BuildLock(tmp_path, poll_s=0.05).acquire()
    )  # young: 30 min limit not reached
    expected = (
        "its process is gone" if case == "pid gone" else "its pid now belongs to another process"
    )
    assert (
        len(lock.stale_owners) == 1
        and expected in lock.stale_owners[0]
        and f"pid {pid} " in caplog.text
    )
    lock.release()


def test_a_live_builder_is_waited_for_with_progress_lines(tmp_path, caplog):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom megamft.platform.build_lock import BuildLock\n"
            "with BuildLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(2)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert holder.stdout.readline().strip() == "held"
    caplog.set_level("INFO", logger="megamft.platform.build_lock")
    began = time.monotonic()
    lock = _within(30, lambda: BuildLock(tmp_path, poll_s=0.05, progress_every_s=0.3).acquire())
    waited = time.monotonic() - began
    assert holder.wait(10) == 0
    assert waited > 1.0 and lock.stale_owners == []
    assert f"waiting for the build in {tmp_path} by pid {holder.pid} on" in caplog.text
    lock.release()


def _slow_compiler(tmp_path: Path, mark: Path) -> Path:
    """A C++ compiler that, asked to compile, says so in `mark` and then takes minutes."""
    script = tmp_path / "slow-c++"
    script.write_text(
        f'#!/bin/sh\ncase " $* " in *" -c "*) touch {mark}; sleep 300;; esac\nexec c++ "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_a_build_killed_midway_leaves_locks_that_the_next_build_clears(tmp_path, caplog):
    source = kernel_jobs.write_source(tmp_path / "src")
    folder, mark = tmp_path / "kernels" / "ext", tmp_path / "compiling"
    killed = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "kernel_jobs.py"), str(folder), str(source)],
        env=_env(CXX=str(_slow_compiler(tmp_path, mark))),
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not mark.exists():
        assert killed.poll() is None and time.monotonic() < deadline, (
            "the build did not start compiling"
        )
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    # What a killed build leaves: torch's lock file and megamft's lock, and no record of a complete build.
    assert (folder / kernel_cache.TORCH_BATON).exists() and (folder / LOCK_NAME).exists()
    assert kernel_cache.load_built(folder, kernel_jobs.KEY) is None
    module = _within(120, lambda: kernel_jobs.build_or_load(folder, source))
    assert module.answer() == 42
    assert f"its process is gone (pid {killed.pid} on" in caplog.text
    assert not (folder / LOCK_NAME).exists()
    if (
        kernel_cache.torch_lock_blocks_when_left()
    ):  # torch <= 2.13: its FileBaton must go (>= 2.14: an flock)
        assert "removed torch's build lock, left by a killed build" in caplog.text
        assert not (folder / kernel_cache.TORCH_BATON).exists()


# --- complete builds ------------------------------------------------------------------------------


def test_only_a_complete_build_of_the_same_sources_is_loaded(tmp_path):
    source = kernel_jobs.write_source(tmp_path / "src", answer=7)
    compiled = []
    folder = tmp_path / "kernels" / "ext"
    assert kernel_jobs.build_or_load(folder, source, compiled).answer() == 7 and len(compiled) == 1
    assert (
        kernel_jobs.build_or_load(folder, source, compiled).answer() == 7 and len(compiled) == 1
    )  # loaded
    record = json.loads((folder / kernel_cache.RECORD).read_text())
    assert kernel_cache.load_built(folder, "another key") is None
    # A changed source (or setting) gives another key, hence another folder.
    settings = {"torch": "x"}
    key = kernel_cache.build_key([source], settings)
    assert kernel_cache.build_key([source], {"torch": "y"}) != key
    kernel_jobs.write_source(tmp_path / "src", answer=8)
    assert kernel_cache.build_key([source], settings) != key
    # Copies of the folder (never loaded by this process): a library that is not the one recorded (a link
    # killed half-way), or no record (a build killed before it was written), is not loaded.
    truncated, unrecorded = tmp_path / "truncated", tmp_path / "unrecorded"
    shutil.copytree(folder, truncated)
    shutil.copytree(folder, unrecorded)
    library = truncated / record["library"]
    library.write_bytes(library.read_bytes()[:1000])
    assert kernel_cache.load_built(truncated, kernel_jobs.KEY) is None
    (unrecorded / kernel_cache.RECORD).unlink()
    assert kernel_cache.load_built(unrecorded, kernel_jobs.KEY) is None
    assert kernel_cache.load_built(folder, kernel_jobs.KEY).answer() == 7


def test_the_kernels_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAMFT_KERNELS_DIR", str(tmp_path / "image"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch"))
    assert kernel_cache.build_folder(None, "ext", "k") == tmp_path / "image" / "ext-k"
    monkeypatch.delenv("MEGAMFT_KERNELS_DIR")
    assert kernel_cache.build_folder(None, "ext", "k") == tmp_path / "torch" / "megamft" / "ext-k"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert (
        kernel_cache.build_folder(None, "ext", "k")
        == tmp_path / "cache" / "megamft" / "kernels" / "ext-k"
    )


# --- start-up: once per node, agreed by every rank ------------------------------------------------


def test_startup_builds_once_per_node_and_every_rank_agrees(tmp_path):
    source = kernel_jobs.write_source(tmp_path / "src")
    ranks = launch(
        kernel_jobs.startup_scenarios,
        world_size=2,
        kwargs={"root": str(tmp_path / "kernels"), "source": str(source)},
        timeout=300,
    )
    one, fails, no_load, two = ([r[name] for r in ranks] for name in kernel_jobs.SCENARIOS)
    # One node (LOCAL_RANK 0 and 1): rank 0 compiles, rank 1 loads that build after the barrier.
    assert [r["compiled"] for r in one] == [
        [str(tmp_path / "kernels" / "one_node" / "node" / "ext")],
        [],
    ]
    assert all(r["use_kernels"] and r["builders"] == [0] and r["answer"] == 42 for r in one)
    assert one[0]["library"] == one[1]["library"]
    # The builder fails: every rank runs the torch path, for the builder's reason.
    for r in fails:
        assert not r["use_kernels"] and r["answer"] is None
        assert (
            r["reason"].startswith("rank 0 on ")
            and "(which built): no CUDA toolkit found" in r["reason"]
        )
    # A rank cannot load what was built: no rank uses the kernels, not even the builder.
    for r in no_load:
        assert not r["use_kernels"] and r["answer"] is None and "rank 1 on " in r["reason"]
        assert "cannot open shared object file" in r["reason"]
    assert [len(r["compiled"]) for r in no_load] == [1, 0]
    # Two nodes of one rank each: each is its node's local rank 0 and builds into its own folder.
    assert [len(r["compiled"]) for r in two] == [1, 1]
    assert all(r["use_kernels"] and r["builders"] == [0, 1] and r["answer"] == 42 for r in two)


# --- the prebuild command -------------------------------------------------------------------------


def test_build_kernels_without_a_cuda_torch_says_what_is_missing(tmp_path):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: tests/test_fused_ce.py builds the kernels on a GPU")
    proc = subprocess.run(
        [sys.executable, "-m", "megamft", "build-kernels", "--build-dir", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=_env(),
    )
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("megamft build-kernels: ")
        and "not a CUDA build" in lines[0]
    )
    assert not (tmp_path / "k").exists()
