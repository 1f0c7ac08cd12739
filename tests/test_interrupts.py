"""Ctrl-C at any moment of a megamft command ends it within seconds and loses nothing that was done.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the command and every helper
it started (preprocessing workers, checkpoint writers, megatron's managers). Each test starts a real
command in a session of its own, holds it at a named moment (megamft.platform.kill_points: the
stall touches a marker file, then waits; or, for HumanEval, while its sandboxed programs sleep),
sends SIGINT to its group as the terminal does, and checks:
exit 130 within seconds with `PROG: interrupted` as the last line and no traceback; no process of
the command left (each carries the test's MEGAMFT_TEST_RUN marker); no lock file, no `.partial`
file or folder; and the earlier output intact (compared with a fingerprint taken before, or read
back with megatron-core's own checkpoint loader).

A full disk during a save is a real full file system: save_dir is a small tmpfs in a mount namespace
of the command's own (as tests/mistakes.py makes them), filled by the namespace's shell while the
run is held at the start of its second save.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mistakes import PROGRAMS, _fingerprint, can_mount
from training_runs import ROOT, SETTINGS, kill_all, processes_with, wait_for

ENDS_WITHIN_S = 15.0
TRAIN = [
    "megamft",
    "train",
    *[f"{k}={v}" for k, v in SETTINGS.items() if k != "parallel.tensor_model_parallel_size"],
]


def _sigint_at_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Held:
    """A command started in a session of its own (its own process group), held at a kill point."""

    def __init__(self, tmp: Path, argv: list[str], stall: str, env: dict | None = None):
        self.marker, self.ready = uuid.uuid4().hex, tmp / f"held-{uuid.uuid4().hex[:6]}"
        program, *rest = argv
        command = [sys.executable, *PROGRAMS[program], *rest]
        extra, env = (
            env,
            {
                k: v
                for k, v in os.environ.items()
                if k
                not in (
                    "MEGAMFT_DEBUG",
                    "RANK",
                    "LOCAL_RANK",
                    "WORLD_SIZE",
                    "MASTER_ADDR",
                    "MASTER_PORT",
                )
            },
        )
        env.update(
            MEGAMFT_TEST_RUN=self.marker,
            MEGAMFT_STALL_AT=stall,
            MEGAMFT_STALL_MARKER=str(self.ready),
            **(extra or {}),
        )
        self.stderr_path = tmp / f"stderr-{self.marker[:6]}.txt"
        with open(self.stderr_path, "w") as stderr:
            # As a terminal's shell starts a foreground job: Ctrl-C's signal at its default. (A test runner's
            # worker may ignore SIGINT, and an ignored signal stays ignored across exec.)
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_sigint_at_default,
            )

    def wait_until_held(self, timeout: float = 240) -> None:
        try:
            wait_for(
                lambda: self.ready.exists() or self.proc.poll() is not None,
                timeout=timeout,
                what="the command held at its kill point",
            )
        except TimeoutError:
            kill_all(self.marker)
            raise
        assert self.proc.poll() is None, f"ended before its kill point:\n{self.stderr()[-3000:]}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def ctrl_c(held: Held, prog: str) -> None:
    """SIGINT to the command's process group; check the way it ends and that nothing of it lives on."""
    started = time.monotonic()
    os.killpg(held.proc.pid, signal.SIGINT)
    try:
        held.proc.wait(timeout=ENDS_WITHIN_S)
    except subprocess.TimeoutExpired:
        kill_all(held.marker)
        pytest.fail(f"still running {ENDS_WITHIN_S} s after Ctrl-C:\n{held.stderr()[-3000:]}")
    took = time.monotonic() - started
    stderr = held.stderr()
    lines = [line for line in stderr.splitlines() if line.strip()]
    try:
        wait_for(
            lambda: not processes_with(held.marker),
            timeout=5,
            what="every process of the command ended",
        )
    except TimeoutError:
        left = processes_with(held.marker)
        kill_all(held.marker)
        pytest.fail(f"processes outlived the interrupted command: {[_command(p) for p in left]}")
    assert held.proc.returncode == 130, (held.proc.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1] == f"{prog}: interrupted", stderr[-3000:]
    assert took < ENDS_WITHIN_S


def leftovers(folder: Path) -> list[str]:
    """Locks (and their private copies), `.partial` files and folders, `.old` folders under `folder`'s parent."""
    from megamft.platform.folder_lock import LOCK_NAME

    return sorted(
        str(p)
        for p in folder.parent.rglob("*")
        if p.name.startswith(LOCK_NAME) or ".partial" in p.name or p.name.endswith(".old")
    )


def _command(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")[:200]
        )
    except OSError:
        return "?"


# ---- megamft-preprocess -------------------------------------------------------------------------------------


def _jsonl(path: Path, count: int, salt: str) -> Path:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Write function number {i} {salt}."},
                    {"role": "assistant", "content": f"def f{i}():\n    return {i}  # {salt}"},
                ]
            }
        )
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_ctrl_c_in_preprocess_with_two_workers(tmp_path):
    """Held after the workers returned the first chunk of the second run's task: the earlier output stays."""
    out = tmp_path / "work" / "out"
    first = [
        "megamft-preprocess",
        "--task",
        f"a={_jsonl(tmp_path / 'a.jsonl', 40, 'first')}",
        "--out",
        str(out),
        "--quiet",
    ]
    done = subprocess.run(
        [sys.executable, *PROGRAMS["megamft-preprocess"], *first[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    before = _fingerprint(out)
    big = _jsonl(tmp_path / "b.jsonl", 2000, "second")  # 8 chunks of 256 lines
    held = Held(
        tmp_path,
        [
            "megamft-preprocess",
            "--task",
            f"a={big}",
            "--out",
            str(out),
            "--workers",
            "2",
            "--quiet",
        ],
        "preprocess.chunk@2:60",
    )
    held.wait_until_held()
    ctrl_c(held, "megamft-preprocess")
    assert leftovers(out) == []
    assert _fingerprint(out) == before


# ---- megamft train --------------------------------------------------------------------------------------------


def _train(tmp: Path, save_dir: Path, *overrides: str) -> list[str]:
    return [
        *TRAIN,
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval=2",
        f"train.tensorboard_dir={tmp / 'tb'}",
        *overrides,
    ]


def _checkpoint_intact(save_dir: Path, iteration: int, files_before: dict) -> None:
    """`latest` names `iteration`, its files are those written before the interruption, and megatron-core
    loads its common state (progress) and its tensors."""
    from megatron.core import dist_checkpointing

    from megamft.checkpoint.layout import latest_iteration

    assert latest_iteration(save_dir) == iteration
    folder = save_dir / f"iter_{iteration:07d}"
    assert _fingerprint(folder) == files_before
    common = dist_checkpointing.load_common_state_dict(str(folder))
    assert common["progress"]["iteration"] == iteration
    assert len(dist_checkpointing.load_tensors_metadata(str(folder))) > 0


def _held_training(
    tmp_path: Path, stall: str, *overrides: str, published: int = 2
) -> tuple[Held, Path, dict]:
    """A run held at `stall`, once the checkpoint of step `published` is published; the files of that one."""
    from megamft.checkpoint.layout import latest_iteration

    save_dir = tmp_path / "ckpt"
    held = Held(tmp_path, _train(tmp_path, save_dir, *overrides), stall)
    held.wait_until_held()
    wait_for(
        lambda: latest_iteration(save_dir) == published,
        timeout=60,
        what=f"step {published}'s checkpoint",
    )
    return held, save_dir, _fingerprint(save_dir / f"iter_{published:07d}")


@pytest.mark.slow
def test_ctrl_c_between_training_steps(tmp_path):
    held, save_dir, files = _held_training(tmp_path, "step.done@3:60")
    ctrl_c(held, "megamft")
    assert leftovers(save_dir) == []
    _checkpoint_intact(save_dir, 2, files)


@pytest.mark.slow
def test_ctrl_c_during_a_save(tmp_path):
    """Held with step 4's shards written, not yet published: the `.partial` folder goes, step 2's stays."""
    held, save_dir, files = _held_training(tmp_path, "save.written@4:60")
    assert (save_dir / "iter_0000004.partial").is_dir()
    ctrl_c(held, "megamft")
    assert leftovers(save_dir) == []
    _checkpoint_intact(save_dir, 2, files)


@pytest.mark.slow
def test_ctrl_c_during_an_asynchronous_save(tmp_path):
    """Held in step 6's background writer (a forked process of megatron's async save) while the trainer goes
    on; step 4's checkpoint is published meanwhile (at a later step, or while the end of the run waits)."""
    held, save_dir, files = _held_training(
        tmp_path,
        "save.writing@6:60",
        "checkpoint.async_save=true",
        "train.train_steps=8",
        published=4,
    )
    ctrl_c(held, "megamft")
    assert leftovers(save_dir) == []
    _checkpoint_intact(save_dir, 4, files)


# ---- a full disk during a save --------------------------------------------------------------------------------


def _on_a_disk_filled_when_held(
    argv: list[str], folder: Path, size: str, ready: Path, report: Path
) -> list[str]:
    """`argv` run where `folder` is a tmpfs of `size`, which a background shell fills up once `ready` exists
    (the run is held at its kill point) and step 4's checkpoint is published; `report` then lists what the
    tmpfs held when the run ended (it is gone with the namespace)."""
    path, flag, listing = (shlex.quote(str(p)) for p in (folder, ready, report))
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {path} || exit 99; "
        f'{{ until [ -e {flag} ] && [ "$(cat {path}/latest 2>/dev/null)" = 4 ]; do sleep 0.05; done; '
        f"dd if=/dev/zero of={path}/filler bs=64k 2>/dev/null; }} & "
        f'"$@"; status=$?; cd {path} && ls -A > {listing}.ls; cat latest > {listing}.latest; '
        f'ls iter_$(printf %07d "$(cat latest)") > {listing}.latest_files; exit $status'
    )
    namespaces = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    return ["unshare", *namespaces, "--propagation", "private", "sh", "-c", script, "sh", *argv]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_disk_that_fills_during_a_save_says_so_in_one_line(tmp_path, async_save):
    """save_dir on a 16 MiB tmpfs (room for several checkpoints of the tiny model: the start-up check
    passes), filled up once step 4's checkpoint is published, while the run is held at the start of step 6's
    save (asynchronous: while step 6's background writer is held and the trainer goes on; it publishes the
    saves of steps 2 and 4 at a later step, or while the end of the run waits for the writers)."""
    if not can_mount():
        pytest.skip("needs a mount namespace of its own (root, or unprivileged user namespaces)")
    save_dir, ready, report = tmp_path / "ckpt", tmp_path / "held", tmp_path / "report"
    save_dir.mkdir()
    marker = uuid.uuid4().hex
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MEGAMFT_DEBUG", "RANK", "WORLD_SIZE")},
        "MEGAMFT_TEST_RUN": marker,
        "MEGAMFT_STALL_AT": "save.writing@6:20" if async_save else "save.started@6:3",
        "MEGAMFT_STALL_MARKER": str(ready),
    }
    program, *rest = _train(
        tmp_path,
        save_dir,
        f"checkpoint.async_save={str(async_save).lower()}",
        "train.train_steps=8",
    )
    argv = _on_a_disk_filled_when_held(
        [sys.executable, *PROGRAMS[program], *rest], save_dir, "16m", ready, report
    )
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        kill_all(marker)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert ready.exists(), done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"megamft: {save_dir}") and "no space left" in lines[-1], lines[-3:]
    listed = Path(f"{report}.ls").read_text().split()
    assert not [
        name for name in listed if ".partial" in name or name.startswith(".megamft.lock")
    ], listed
    assert Path(f"{report}.latest").read_text().strip() == "4"
    assert "iter_0000004" in listed and "iter_0000006" not in listed, listed
    assert "metadata.json" in Path(f"{report}.latest_files").read_text().split()


# ---- megamft-convert megatron-to-hf ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Llama, its tokenizer and its megamft conversion (tmp/hf, tmp/ckpt)."""
    import torch
    from data_fixtures import make_hf_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from megamft.checkpoint.hf_convert import hf_to_megatron
    from megamft.data.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("converted")
    tok = load_tokenizer(str(make_hf_tokenizer(tmp / "hf")))
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.max_token_id + 1,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    ).save_pretrained(str(tmp / "hf"))
    hf_to_megatron(tmp / "hf", tmp / "ckpt")
    return tmp


def test_ctrl_c_during_an_export(tmp_path, converted):
    """Held after layer 0 is converted into the temporary folder; an earlier export at --out stays."""
    out = tmp_path / "exports" / "hf"
    argv = [
        "megamft-convert",
        "megatron-to-hf",
        "--checkpoint",
        str(converted / "ckpt"),
        "--out",
        str(out),
        "--hf-template",
        str(converted / "hf"),
    ]
    done = subprocess.run(
        [sys.executable, *PROGRAMS["megamft-convert"], *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    before = _fingerprint(out)
    held = Held(tmp_path, argv, "export.layer@0:60")
    held.wait_until_held()
    assert (out.with_name("hf.partial")).is_dir()
    ctrl_c(held, "megamft-convert")
    assert leftovers(out) == []
    assert _fingerprint(out) == before


# ---- megamft eval humaneval -----------------------------------------------------------------------------------


def test_ctrl_c_during_an_evaluation(tmp_path, converted):
    """Held after problem 1's programs ran: its results stay, and a rerun resumes after them."""
    out = tmp_path / "eval"
    argv = [
        "megamft",
        "eval",
        "humaneval",
        str(converted / "hf"),
        "--output",
        str(out),
        "--prompt-format",
        "completion",
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
        "--k",
        "1",
        "--backend",
        "transformers",
    ]
    held = Held(tmp_path, argv, "eval.problem@1:60")
    held.wait_until_held()
    results = out / "results.jsonl"
    written = results.read_bytes()
    assert len(written.splitlines()) == 2
    ctrl_c(held, "megamft")
    assert leftovers(out) == []
    assert results.read_bytes() == written


def test_ctrl_c_while_programs_run(tmp_path, converted, request):
    """Eight samples whose program sleeps a minute, two at a time (--timeout 120): Ctrl-C while the first two run
    ends the command at once, their programs and working folders with it, the six queued never started."""
    # Whatever the model writes lands in a string: every program runs, and sleeps.
    problem = {
        "task_id": "Slow/0",
        "prompt": 'import time\ntime.sleep(60)\nnotes = """',
        "canonical_solution": "",
        "test": '"""\n\ndef f():\n    pass\n\ndef check(candidate):\n    pass\n',
        "entry_point": "f",
    }
    problems = tmp_path / "slow.jsonl"
    problems.write_text(json.dumps(problem) + "\n")
    # The command's TMPDIR, where the sandbox's working folders appear: one the sandbox user may traverse.
    scratch = Path(tempfile.mkdtemp(prefix="megamft-interrupts-"))
    scratch.chmod(0o711)
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    argv = [
        "megamft",
        "eval",
        "humaneval",
        str(converted / "hf"),
        "--output",
        str(tmp_path / "eval"),
        "--problems",
        str(problems),
        "--prompt-format",
        "completion",
        "--n",
        "8",
        "--temperature",
        "0.8",
        "--k",
        "1",
        "--max-new-tokens",
        "4",
        "--timeout",
        "120",
        "--workers",
        "2",
        "--backend",
        "transformers",
    ]
    held = Held(tmp_path, argv, "", env={"TMPDIR": str(scratch)})
    wait_for(
        lambda: len(list(scratch.glob("megamft-sandbox-*"))) == 2 or held.proc.poll() is not None,
        timeout=120,
        what="two programs running",
    )
    time.sleep(1)
    ctrl_c(held, "megamft")
    assert list(scratch.iterdir()) == []
    assert not [pid for pid in _pids() if str(scratch) in _command(pid)]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
