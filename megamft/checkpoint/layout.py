"""The layout of a megamft checkpoint folder, shared by training, conversion and export.

    iter_0000040/          one complete dist checkpoint (any TP/PP/DP can load it)
    iter_0000040.partial/  one being written (ignored by loading)
    iter_0000040.old/      the previous copy while a re-save replaces it
    latest                 text file naming the newest complete iteration
    best                   text file naming the best one by checkpoint.best_metric (with checkpoint.keep_best)
An iteration folder holds megatron's files, megamft_config.json (the run's config) and, for a run
on preprocessed data, megamft_data.json (the data's identity: data/identity.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from megamft.errors import UserError

LATEST = "latest"
BEST = "best"
POINTERS = (LATEST, BEST)
CONFIG_FILE = "megamft_config.json"
DATA_IDENTITY_FILE = "megamft_data.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded as asked: missing, incomplete, damaged, or of another model."""


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def complete_dir(save_dir: str | Path, iteration: int) -> Path:
    """The folder of a complete checkpoint, also mid-way through replacing it (see output_folder.publish)."""
    final = iteration_dir(save_dir, iteration)
    aside = final.with_name(final.name + ".old")
    return aside if not final.is_dir() and aside.is_dir() else final


def complete_iterations(save_dir: str | Path) -> list[int]:
    """Iterations of the complete checkpoints in save_dir, oldest first."""
    return sorted(
        int(p.name[len("iter_") :])
        for p in Path(save_dir).glob("iter_*")
        if p.is_dir() and p.name[len("iter_") :].isdigit()
    )


def latest_iteration(save_dir: str | Path, pointer_name: str = LATEST) -> int | None:
    """The newest complete checkpoint's iteration (or the one another pointer names, e.g. BEST), or None."""
    pointer = Path(save_dir) / pointer_name
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    if not text.isdigit() or not complete_dir(save_dir, int(text)).is_dir():
        raise CheckpointError(
            f"{pointer} names '{text}', which is not a complete checkpoint in {save_dir}; "
            "point it at one (or remove it to start afresh)"
        )
    return int(text)


def pointed_checkpoint(path: str | Path) -> Path:
    """A checkpoint named by its pointer (`<save_dir>/best`, `<save_dir>/latest`) as its iteration folder;
    any other path as it is."""
    path = Path(path)
    if path.name not in POINTERS or not path.is_file():
        return path
    return complete_dir(path.parent, latest_iteration(path.parent, path.name))


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
