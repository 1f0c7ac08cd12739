"""What every command runs through (megamft.entry_point): library warnings kept out of a command's output,
MEGAMFT_DEBUG, and one report from a job of several ranks started without torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import damaged_inputs as damaged
import pytest
from damaged_inputs import TINY_MODEL
from mistakes import ROOT

from megamft.testing.distributed import _rank_env, free_port


def _command(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MEGAMFT_DEBUG", "RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_library_warnings_stay_out_of_a_commands_output_unless_debugging(tmp_path):
    """An export drives torch's checkpoint reader without a process group, which warns on every read
    (torch/distributed/checkpoint/utils.py); a user sees none of it, MEGAMFT_DEBUG=1 shows it."""
    damaged.tiny_checkpoint(tmp_path)
    plain = _command(
        [
            "-m",
            "megamft.checkpoint.convert_cli",
            "megatron-to-hf",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "hf-out"),
        ]
    )
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr[-3000:]
    debugging = _command(
        [
            "-m",
            "megamft.checkpoint.convert_cli",
            "megatron-to-hf",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "hf-debug"),
        ],
        MEGAMFT_DEBUG="1",
    )
    assert (
        debugging.returncode == 0
        and "UserWarning: torch.distributed is disabled" in debugging.stderr
    )


def test_debugging_adds_the_traceback_to_a_users_mistake():
    done = _command(
        ["-m", "megamft", "check", "--world-size", "1", "train.stpes=3"], MEGAMFT_DEBUG="1"
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" in done.stderr and "ConfigError" in done.stderr
    assert lines[-1].startswith("megamft: invalid config: unknown key 'train.stpes'")


@pytest.mark.slow
def test_ranks_started_without_torchrun_say_a_mistake_of_rank_1_once(tmp_path):
    """Two plain processes (RANK, WORLD_SIZE, MASTER_PORT set, as srun would): rank 1's data is damaged;
    rank 1 says so, rank 0 (which loses its peer in the middle of a collective) stays quiet with exit 3."""
    damaged.data_damaged_on_rank_1(tmp_path)
    port = free_port()
    procs = []
    for rank in range(2):
        data = tmp_path / ("data-rank1" if rank else "data")
        env = {**_rank_env(rank, 2, port), "MEGAMFT_LOG_LEVEL": "WARNING"}
        env.pop("MEGAMFT_DEBUG", None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "megamft",
                    "train",
                    *TINY_MODEL,
                    "data.source=indexed",
                    f"data.path={data}",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=300) for proc in procs]
    codes = [proc.returncode for proc in procs]
    errors = [[line for line in err.splitlines() if line.strip()] for _, err in outputs]
    assert codes == [3, 2], (codes, errors)
    assert errors[0] == [], errors[0]
    assert (
        len(errors[1]) == 1
        and errors[1][0].startswith("megamft: rank 1: ")
        and "truncated" in errors[1][0]
    )
    assert Path(tmp_path / "data").is_dir()
