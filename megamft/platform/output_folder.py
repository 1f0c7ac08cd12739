"""Folders megamft writes: who owns them, when they may be replaced, and how they are published.

Every command that writes a folder (training's save_dir, both conversions,
preprocessing) goes through here, so the same rules protect the user's work:

- ``check_destination`` refuses a destination that is or holds one of the
  command's inputs, and a non-empty destination
  that is not this kind of megamft output, unless ``overwrite``;
- ``folder_lock.FolderLock`` lets one process at a time write a folder, and
  tells a live owner from a stale lock left by a killed run, on any host;
- ``publish`` moves a finished temporary sibling into place; the previous
  folder is kept aside until the new one is there, so a kill at any moment
  leaves one complete folder;
- ``written_beside`` writes a folder into its temporary sibling and publishes
  it, or removes it when the writing fails or is interrupted (Ctrl-C).

An output is recognised by ``OUTPUT_MARKER``, a small JSON file naming its kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from megamft.errors import UserError

OUTPUT_MARKER = ".megamft-output.json"
TRAINING_OUTPUT = "training"  # a training run's checkpoint.save_dir


class DestinationError(UserError, ValueError):
    """A destination folder that must not be written as asked."""


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def output_kind(folder: str | Path) -> str | None:
    """The kind of megamft output this folder holds, or None."""
    marker = Path(folder) / OUTPUT_MARKER
    try:
        return json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark_output(folder: str | Path, kind: str, **details) -> None:
    """Say what this folder is (written before it is published)."""
    (Path(folder) / OUTPUT_MARKER).write_text(
        json.dumps({"kind": kind, **details}, indent=2) + "\n"
    )


def check_destination(
    destination: str | Path,
    kind: str,
    inputs=(),
    overwrite: bool = False,
    option: str = "--out",
    recognise=None,
) -> None:
    """Refuse a destination that would destroy inputs or someone else's work.

    `inputs`: paths the command reads. `recognise(folder) -> bool` may accept
    outputs written before the marker existed. Raises DestinationError with
    what to do.
    """
    dest = _resolved(destination)
    for source in inputs:
        if source is None:
            continue
        if _inside(_resolved(source), dest):
            raise DestinationError(
                f"{option} {destination} holds the input {source}; replacing it would destroy that input. "
                f"Choose a new folder for {option}"
            )
    if dest.exists() and not dest.is_dir():
        raise DestinationError(f"{option} {destination} is a file, not a folder; choose a folder")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    ours = output_kind(dest) == kind or (recognise is not None and recognise(dest))
    if ours or overwrite:
        return
    found = output_kind(dest)
    what = f"a megamft {found} output" if found else "files that megamft did not write"
    raise DestinationError(
        f"{option} {destination} is not empty and holds {what}, not a {kind} output; nothing was written. "
        f"Choose an empty or new folder, or pass --overwrite to write into it anyway"
    )


def publish(partial: Path, final: Path) -> None:
    """Move a finished temporary folder into place, keeping any older copy aside until then."""
    aside = final.with_name(final.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        if final.exists():
            os.replace(final, aside)
        os.replace(partial, final)
    except BaseException:  # (Ctrl-C between the two renames) the previous folder goes back
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def temporary_sibling(final: Path) -> Path:
    """An empty `<name>.partial` folder beside `final`, for writing before `publish`."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


@contextlib.contextmanager
def written_beside(final: Path) -> Iterator[Path]:
    """`with written_beside(final) as partial:` write into `partial`; published as `final` when the block
    ends well, removed when it raises or is interrupted: a complete folder at `final`, or the previous one."""
    partial = temporary_sibling(final)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, final)
