"""The --out folder of a megamft-preprocess run: claimed, written as .partial files, published last.

Rules (with the other commands' through platform/output_folder.py):
- `--out` must not hold, equal or lie inside an input (a task file or folder,
  the tokenizer's files): refused even with --overwrite;
- a non-empty `--out` that is not a megamft-preprocess output (its marker, or
  the manifest.json of an older one) is refused unless --overwrite;
- one run at a time: the run holds a FolderLock in `--out` itself. The folder
  is never renamed (its files are), so the lock stays valid until the run ends;
- files are written as `<name>.partial` and renamed when the whole run has
  succeeded, the manifest last; a failed run removes its partial files (also
  when the disk is full) and leaves any previous output as it was.
On success, files of the previous output that the new one does not have
(tasks no longer given) are removed; files megamft did not write are kept.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megamft.data.indexed import PARTIAL_SUFFIX, IndexedWriter
from megamft.data.manifest import CHECKSUMS, MANIFEST, OUTPUT_KIND, read_manifest, task_files
from megamft.data.preprocess_inputs import PreprocessError
from megamft.platform.folder_lock import LOCK_NAME, FolderLock
from megamft.platform.output_folder import (
    OUTPUT_MARKER,
    DestinationError,
    check_destination,
    mark_output,
    output_kind,
)


def written_by_preprocess(folder: Path) -> bool:
    """An output of megamft-preprocess older than the marker, or what a killed run of it left."""
    if read_manifest(folder / MANIFEST) is not None:
        return True
    names = [p.name for p in folder.iterdir()]
    # the lock, or a private copy of it that a kill mid-write left (folder_lock writes those first)
    return bool(names) and all(n.startswith(LOCK_NAME) or n.endswith(PARTIAL_SUFFIX) for n in names)


def check_not_an_input(out: str | Path, inputs: list) -> None:
    """--out may not be, hold, or lie inside anything the run reads (whatever --overwrite says)."""
    dest = Path(out).expanduser().resolve()
    for source in inputs:
        src = Path(source).expanduser().resolve()
        relation = (
            "is the input"
            if src == dest
            else "holds the input"
            if dest in src.parents
            else "lies inside the input"
            if src in dest.parents
            else None
        )
        if relation:
            raise PreprocessError(
                f"--out {out} {relation} {source}; writing there could overwrite or mix with "
                "what this run reads, with or without --overwrite. Choose a folder outside "
                "the inputs and the tokenizer's folder for --out"
            )


def _quiet_unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class OutputFolder:
    """`with OutputFolder(out, inputs, overwrite) as folder:` claims `out`; `folder.publish(manifest)` ends well."""

    def __init__(self, out: str | Path, inputs: list, overwrite: bool):
        self.path = Path(out)
        self.inputs, self.overwrite = inputs, overwrite
        self.writers: list[IndexedWriter] = []
        self.takeover: str | None = None  # the stale lock taken over: whose, and why
        self._lock: FolderLock | None = None
        self._created = self._marked = self._renaming = False
        self._previous: dict | None = None

    def __enter__(self) -> "OutputFolder":
        check_not_an_input(self.path, self.inputs)
        try:
            check_destination(
                self.path,
                OUTPUT_KIND,
                self.inputs,
                self.overwrite,
                "--out",
                recognise=written_by_preprocess,
            )
            self._created = not self.path.exists()
            self._lock = FolderLock(self.path, "preprocess run").acquire()
        except DestinationError as err:
            raise PreprocessError(str(err)) from None
        except OSError as err:
            raise PreprocessError(
                f"--out {self.path} cannot be written ({err.strerror}); "
                "choose a folder this user can write"
            ) from None
        self.takeover = self._lock.takeover
        ours = output_kind(self.path) == OUTPUT_KIND or written_by_preprocess(self.path)
        self._marked = output_kind(self.path) == OUTPUT_KIND
        self._previous = read_manifest(self.path / MANIFEST) if ours else None
        if ours:  # what a killed run left
            for leftover in self.path.glob(f"*{PARTIAL_SUFFIX}"):
                _quiet_unlink(leftover)
        return self

    @property
    def replacing(self) -> bool:
        """Whether publishing had begun (the previous output is no longer whole)."""
        return self._renaming

    def writer(self, name: str, dtype) -> IndexedWriter:
        writer = IndexedWriter(self.path / name, dtype)
        self.writers.append(writer)
        return writer

    def publish(self, manifest: dict) -> None:
        """Finish every file, record their checksums in the manifest, then swap: old manifest out, data in,
        new manifest last."""
        for writer in self.writers:
            writer.finish()
        manifest[CHECKSUMS] = {
            name: record for writer in self.writers for name, record in writer.checksums().items()
        }
        partial = self.path / (MANIFEST + PARTIAL_SUFFIX)
        with open(partial, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if not self._marked:
            mark_output(self.path, OUTPUT_KIND)
        self._renaming = True
        (self.path / MANIFEST).unlink(missing_ok=True)
        for writer in self.writers:
            writer.publish()
        os.replace(partial, self.path / MANIFEST)
        self._remove_replaced(manifest)

    def _remove_replaced(self, manifest: dict) -> None:
        """Files of the previous output that the new one does not have."""
        if self._previous is None:
            return
        kept = {name for entry in manifest["tasks"] for name in task_files(entry)}
        for entry in self._previous.get("tasks", []):
            try:
                old = task_files(entry)
            except (KeyError, TypeError):
                continue
            for name in old:
                if name not in kept and Path(name).name == name:
                    _quiet_unlink(self.path / name)

    def _abandon(self) -> None:
        """Remove what this run wrote; never raises, so the run's own error is what the user sees."""
        for writer in self.writers:
            writer.discard()
        _quiet_unlink(self.path / (MANIFEST + PARTIAL_SUFFIX))
        if not self._marked and not self._renaming:
            _quiet_unlink(self.path / OUTPUT_MARKER)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon()
        self._lock.release()
        if exc_type is not None and self._created:
            try:
                self.path.rmdir()  # only if empty: the run created it and left nothing in it
            except OSError:
                pass


def report_stale_lock(folder: OutputFolder) -> None:
    if folder.takeover is not None:
        print(
            f"megamft-preprocess: took over the lock of a run that is gone ({folder.takeover})",
            file=sys.stderr,
        )
