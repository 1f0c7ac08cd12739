"""A run's folders as every node sees them: absolute everywhere, the same folder on every node, room for
every checkpoint the run keeps."""

import os
import shutil
import socket
from collections import namedtuple
from pathlib import Path

import platform_jobs
import pytest

from megamft.checkpoint import dist_checkpoint, run_folder
from megamft.checkpoint.layout import LATEST, complete_iterations, iteration_dir, write_atomically
from megamft.config import load_config, to_dict
from megamft.platform.output_folder import DestinationError
from megamft.platform.shared_folder import PROBE_PREFIX
from megamft.sizing.memory import checkpoint_bytes
from megamft.testing.distributed import launch

# ---- every node sees the same save_dir -------------------------------------------------------------------


def test_every_rank_sees_the_probe_in_a_shared_folder(tmp_path):
    errors = launch(
        platform_jobs.shared_folder_check,
        world_size=2,
        timeout=120,
        kwargs={"folder": str(tmp_path), "own_folder_rank": None, "own_folder": ""},
    )
    assert errors == [None, None]
    assert not list(tmp_path.glob(f"{PROBE_PREFIX}*"))  # the probe is removed


def test_a_rank_with_its_own_folder_at_that_path_is_named_on_every_rank(tmp_path):
    own = tmp_path / "node-local" / "run"
    own.mkdir(parents=True)
    shared = tmp_path / "run"
    shared.mkdir()
    errors = launch(
        platform_jobs.shared_folder_check,
        world_size=2,
        timeout=120,
        kwargs={"folder": str(shared), "own_folder_rank": 1, "own_folder": str(own)},
    )
    assert errors[0] == errors[1] and errors[0] is not None
    assert f"{socket.gethostname()} (ranks 1)" in errors[0] and "ranks 0" not in errors[0]
    assert f"checkpoint.save_dir {shared} is not the same folder on every node" in errors[0]
    assert "shared by every node" in errors[0]
    assert not list(shared.iterdir()) and not list(own.iterdir())


# ---- absolute paths --------------------------------------------------------------------------------------


def test_relative_folders_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        [],
        [
            "checkpoint.save_dir=runs/a",
            "data.path=data/pre",
            "checkpoint.load_dir=../base",
            "train.tensorboard_dir=~/tb",
        ],
    )
    assert cfg.checkpoint.save_dir == str(tmp_path / "runs" / "a")
    assert cfg.data.path == str(tmp_path / "data" / "pre")
    assert cfg.checkpoint.load_dir == str(tmp_path.parent / "base")
    assert cfg.train.tensorboard_dir == str(Path.home() / "tb")


def test_a_run_saved_with_relative_folders_resumes_given_them_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = to_dict(load_config([], ["data.source=indexed"]))
    saved["data"]["path"] = "data/pre"  # as a config saved before paths were made absolute
    now = load_config([], ["data.source=indexed"])
    now.data.path = str(tmp_path / "data" / "pre")
    assert run_folder.run_differences(saved, now) == []
    now.data.path = str(tmp_path / "data" / "other")
    assert run_folder.run_differences(saved, now) == [
        f"data.path: '{tmp_path / 'data' / 'pre'}' -> '{tmp_path / 'data' / 'other'}'"
    ]


# ---- room for the checkpoints the run keeps --------------------------------------------------------------

Case = namedtuple("Case", "keep_last existing start steps interval async_save")
CASES = [
    Case(0, 0, 0, 10, 3, False),
    Case(0, 2, 4, 10, 2, True),
    Case(2, 0, 0, 10, 2, False),
    Case(2, 0, 0, 10, 2, True),
    Case(3, 5, 5, 20, 5, False),
    Case(2, 1, 1, 9, 1, True),
    Case(4, 0, 0, 2, 1, True),
    Case(1, 0, 0, 7, 0, False),
    Case(2, 3, 10, 10, 5, False),
]


def _simulated_peak(tmp: Path, case: Case) -> int:
    """Write the run's saves as the loop does (every interval, then at the end), each as a .partial folder
    published and then pruned by dist_checkpoint.prune; with async saves, the next save starts before the
    previous one is published. Returns the most checkpoint folders present at once beyond those there before."""
    for it in range(1, case.existing + 1):
        iteration_dir(tmp, it).mkdir(parents=True)
    if case.existing:
        write_atomically(tmp / LATEST, f"{case.existing}\n")
    folders = lambda: sum(1 for p in tmp.iterdir() if p.name.startswith("iter_"))  # noqa: E731
    saves = [
        it
        for it in range(case.start + 1, case.steps + 1)
        if case.interval and it % case.interval == 0
    ]
    if case.steps > case.start and (not saves or saves[-1] != case.steps):
        saves.append(case.steps)
    peak, in_flight = folders(), []

    def publish(it):
        partial = iteration_dir(tmp, it).with_name(f"iter_{it:07d}.partial")
        os.replace(partial, iteration_dir(tmp, it))
        write_atomically(tmp / LATEST, f"{it}\n")
        if case.keep_last:
            dist_checkpoint.prune(tmp, case.keep_last)

    for it in saves:
        iteration_dir(tmp, it).with_name(f"iter_{it:07d}.partial").mkdir()
        in_flight.append(it)
        peak = max(peak, folders())
        if len(in_flight) > (1 if case.async_save else 0):
            publish(in_flight.pop(0))
    for it in in_flight:
        publish(it)
    return max(peak - case.existing, 0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_room_counted_is_the_most_checkpoints_the_run_adds_at_once(tmp_path, case):
    expected = _simulated_peak(tmp_path, case)
    cfg = load_config(
        [],
        [
            f"checkpoint.keep_last={case.keep_last}",
            f"train.train_steps={case.steps}",
            f"checkpoint.save_interval={case.interval}",
            f"checkpoint.async_save={case.async_save}",
        ],
    )
    assert run_folder.new_checkpoints_at_once(cfg, case.start, case.existing) == expected


def test_a_save_dir_without_room_for_keep_last_plus_the_one_being_written_is_refused(
    tmp_path, monkeypatch
):
    cfg = load_config(
        [],
        [
            f"checkpoint.save_dir={tmp_path / 'run'}",
            "checkpoint.keep_last=2",
            "checkpoint.save_interval=10",
            "train.train_steps=100",
        ],
    )
    one = checkpoint_bytes(cfg, 256)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**15, 0, int(3 * one) - 1))
    with pytest.raises(DestinationError, match=r"less than the 3 new checkpoint\(s\)"):
        run_folder.check_save_folder(cfg)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**15, 0, int(3 * one) + 1))
    assert run_folder.check_save_folder(cfg) is None
    # Two of this run's checkpoints there already: one more is written before the oldest is pruned.
    for it in (10, 20):
        iteration_dir(tmp_path / "run", it).mkdir()
    write_atomically(tmp_path / "run" / LATEST, "20\n")
    assert complete_iterations(tmp_path / "run") == [10, 20]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**15, 0, int(1 * one) + 1))
    assert run_folder.check_save_folder(cfg) == 20
