"""Preemption as launchers deliver it: the documented commands, signalled the way torchrun and SLURM do.

Each run is `examples/cluster/launch.sh` (torchrun's agent through `megamft launch`,
two workers, TP=2) or `examples/cluster/slurm.sbatch` with stand-ins for srun,
scancel and scontrol. After the signal: the launch command exits 0, a complete
checkpoint of the step in flight exists, no process of the run is left, and the
same command run again resumes and reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml
from training_runs import (
    ROOT,
    SETTINGS,
    STEPS,
    assert_same_curve,
    kill_all,
    losses,
    processes_with,
    signal_all,
    wait_for,
)

from megamft.checkpoint.layout import iteration_dir, latest_iteration
from megamft.testing.distributed import free_port

pytestmark = pytest.mark.slow


class Run:
    """One launch command and every process it starts (they all carry its marker in their environment)."""

    def __init__(self, tmp: Path, name: str, command: list[str], env: dict[str, str]):
        self.tmp, self.name = tmp, name
        self.marker = uuid.uuid4().hex
        self.log = tmp / f"{name}.log"
        env = {
            **env,
            "MEGAMFT_TEST_RUN": self.marker,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def reached_step(self, step: int) -> bool:
        return f"step {step}/" in self.log.read_text()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            print(self.log.read_text()[-4000:])

    def leftovers(self) -> list[int]:
        try:
            wait_for(
                lambda: not processes_with(self.marker),
                timeout=15,
                what="every process of the run ended",
            )
        except TimeoutError:
            pass
        return processes_with(self.marker)

    def stopped_at(self) -> int:
        lines = [
            line
            for line in self.log.read_text().splitlines()
            if "preemption signal: stopped after step" in line
        ]
        assert len(lines) == 1, self.log.read_text()[-3000:]
        return int(lines[0].split("stopped after step")[1].split(",")[0])


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:
        kill_all(run.marker)


def _config(tmp: Path, name: str, **extra) -> Path:
    sections: dict = {}
    for dotted, value in {
        **SETTINGS,
        "train.tensorboard_dir": str(tmp / name / "tb"),
        "checkpoint.save_dir": str(tmp / "ckpt"),
        "train.eval_interval": 0,
        **extra,
    }.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def _launch(tmp: Path, name: str, runs: list, extra_env: dict | None = None, **settings) -> Run:
    env = {**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), **(extra_env or {})}
    run = Run(
        tmp, name, ["bash", "examples/cluster/launch.sh", str(_config(tmp, name, **settings))], env
    )
    runs.append(run)
    return run


def _check_stopped_cleanly(run: Run, save_dir: Path, signalled_after: int) -> int:
    assert run.wait() == 0
    stopped = run.stopped_at()
    assert signalled_after <= stopped < STEPS
    assert latest_iteration(save_dir) == stopped  # the checkpoint of the step in flight, complete
    assert (iteration_dir(save_dir, stopped) / "metadata.json").is_file()
    assert not list(save_dir.glob("*.partial"))
    assert run.leftovers() == []
    return stopped


def _resume_and_compare(
    tmp: Path, runs: list, uninterrupted: dict, stopped: int, first: str = "first"
) -> None:
    resumed = _launch(
        tmp, "resumed", runs
    )  # the same command again: checkpoint.resume=auto continues
    assert resumed.wait() == 0
    assert resumed.leftovers() == []
    kept = {s: v for s, v in losses([tmp / first / "tb"]).items() if s <= stopped}
    assert_same_curve({**kept, **losses([tmp / "resumed" / "tb"])}, uninterrupted)


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path, runs, uninterrupted):
    first = _launch(tmp_path, "first", runs)
    wait_for(lambda: first.reached_step(2), what="step 2")
    first.proc.send_signal(
        signal.SIGTERM
    )  # the launch command's pid: torchrun's agent after its exec
    stopped = _check_stopped_cleanly(first, tmp_path / "ckpt", 2)
    _resume_and_compare(tmp_path, runs, uninterrupted, stopped)


def test_sigusr1_to_every_process_of_the_run_saves_and_exits_0(tmp_path, runs, uninterrupted):
    first = _launch(tmp_path, "first", runs, **{"checkpoint.save_interval": 1})
    # Signal while a checkpoint is being written, so its writer processes get the signal too.
    wait_for(
        lambda: first.reached_step(2) and (tmp_path / "ckpt" / "iter_0000003.partial").exists(),
        what="step 3's checkpoint being written",
    )
    hit = signal_all(
        first.marker, signal.SIGUSR1
    )  # as SLURM does: agent, workers and their helpers
    assert len(hit) >= 3
    stopped = _check_stopped_cleanly(first, tmp_path / "ckpt", 3)
    _resume_and_compare(tmp_path, runs, uninterrupted, stopped)


def test_signal_during_an_asynchronous_save_in_flight(tmp_path, runs, uninterrupted):
    marker = tmp_path / "writer-started"
    first = _launch(
        tmp_path,
        "first",
        runs,
        extra_env={"MEGAMFT_STALL_AT": "save.writing@2:4", "MEGAMFT_STALL_MARKER": str(marker)},
        **{"checkpoint.async_save": True, "checkpoint.save_interval": 2},
    )
    wait_for(marker.exists, what="the background writer of step 2's checkpoint")
    writers = [pid for pid in processes_with(first.marker) if _is_forked_writer(pid)]
    hit = signal_all(first.marker, signal.SIGTERM)
    assert set(writers) <= set(hit) and writers, (writers, hit)
    stopped = _check_stopped_cleanly(first, tmp_path / "ckpt", 2)
    assert (
        iteration_dir(tmp_path / "ckpt", 2) / "metadata.json"
    ).is_file()  # the save in flight completed
    _resume_and_compare(tmp_path, runs, uninterrupted, stopped)


def _is_forked_writer(pid: int) -> bool:
    """A process forked by a worker (same command line as its parent worker)."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        own, parents = (Path(f"/proc/{p}/cmdline").read_bytes() for p in (pid, parent))
    except OSError:
        return False
    return own == parents and b"train" in own


FAKE_SLURM = {
    # srun: one task on this machine, the command run in place (the step's processes are its descendants).
    # Its environment follows srun(1)'s --export: ALL passes the caller's, NONE only the SLURM_* variables;
    # without the option SLURM_EXPORT_ENV decides (`sbatch --export=NONE` sets it), else ALL. The test's
    # marker is kept so that the test can find and clean up the step's processes.
    "srun": """
        #!/usr/bin/env bash
        mode=${SLURM_EXPORT_ENV:-ALL}
        while [[ "$1" == --* ]]; do
            case "$1" in --export=*) mode=${1#--export=};; esac
            shift
        done
        export SLURM_NODEID=0
        if [ "$mode" = NONE ]; then
            kept=()
            while IFS= read -r -d '' var; do
                case "$var" in SLURM_*|MEGAMFT_TEST_RUN=*) kept+=("$var");; esac
            done < <(env -0)
            exec env -i "${kept[@]}" "$@"
        fi
        exec "$@"
    """,
    # scancel --signal=SIG JOB: every process of the job's steps, not the batch shell (SLURM's default).
    "scancel": f"""
        #!{sys.executable}
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from training_runs import signal_all
        sig = getattr(signal, "SIG" + sys.argv[1].split("=")[1])
        print("scancel", *sys.argv[1:], file=open(os.environ["FAKE_SLURM_LOG"], "a"))
        signal_all(os.environ["MEGAMFT_TEST_RUN"], sig, skip=(os.getpid(), os.getppid()))
    """,
    "scontrol": """
        #!/usr/bin/env bash
        if [ "$1" = show ]; then echo localhost; else echo "scontrol $*" >> "$FAKE_SLURM_LOG"; fi
    """,
}


def _sbatch(tmp: Path, name: str, runs: list, **env_vars: str) -> Run:
    bin_dir = tmp / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for tool, script in FAKE_SLURM.items():
        (bin_dir / tool).write_text(textwrap.dedent(script).lstrip())
        (bin_dir / tool).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp / "slurm.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        **env_vars,
    }
    run = Run(tmp, name, ["bash", "examples/cluster/slurm.sbatch", str(_config(tmp, "first"))], env)
    runs.append(run)
    return run


# A site whose jobs start from a clean environment (sbatch --export=NONE), on nodes whose interface is named.
SITE = {
    "SLURM_EXPORT_ENV": "NONE",
    "NCCL_SOCKET_IFNAME": "lo",
    "GLOO_SOCKET_IFNAME": "lo",
    "NCCL_IB_HCA": "mlx5_0",
}


def _worker_environment(marker: str) -> dict[str, str]:
    """The environment a training worker of the run was started with."""
    for pid in processes_with(marker):
        try:
            if b"train" in Path(f"/proc/{pid}/cmdline").read_bytes() and not _is_forked_writer(pid):
                pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)
        except OSError:
            continue
    raise AssertionError("no training worker found")


def test_slurm_batch_script_waits_for_the_save_and_requeues(tmp_path, runs, uninterrupted):
    # The workers hold after step 3 long enough for the signal to go the batch shell's way (a scancel that
    # starts Python) on a loaded machine, where the last steps would otherwise end the run first.
    marker = tmp_path / "step-3-done"
    first = _sbatch(
        tmp_path,
        "first-job",
        runs,
        **SITE,
        MEGAMFT_STALL_AT="step.done@3:15",
        MEGAMFT_STALL_MARKER=str(marker),
    )
    wait_for(marker.exists, what="step 3")
    worker = _worker_environment(first.marker)
    assert {k: worker.get(k) for k in SITE if k != "SLURM_EXPORT_ENV"} == {
        k: v for k, v in SITE.items() if k != "SLURM_EXPORT_ENV"
    }
    first.proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1@600: the batch shell alone
    assert _check_stopped_cleanly(first, tmp_path / "ckpt", 3) == 3
    assert (tmp_path / "slurm.log").read_text().splitlines() == [
        "scancel --signal=USR1 4242",
        "scontrol requeue 4242",
    ]
    # The requeued job: the same batch script, which continues from the checkpoint.
    again = _sbatch(tmp_path, "requeued-job", runs, **SITE)
    assert again.wait() == 0
    assert again.leftovers() == []
    # Both jobs log to the config's one tensorboard folder: the first up to its checkpoint, the second after it.
    assert min(s for s in losses([tmp_path / "first" / "tb"])) == 1
    assert_same_curve(losses([tmp_path / "first" / "tb"]), uninterrupted)
