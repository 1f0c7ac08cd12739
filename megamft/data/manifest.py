"""manifest.json of a megamft-preprocess output: its name, its format, and reading it back.

The manifest is written last and marks a complete output folder; training
reads it to find the tasks and checks every file against it (integrity.py,
and the block checksums under "checksums", taken as the files were written:
verify.py). Manifests written before checksums were recorded have none.
"""

from __future__ import annotations

import json
from pathlib import Path

from megamft.errors import UserError
from megamft.platform.checksums import is_record

MANIFEST = "manifest.json"
CHECKSUMS = (
    "checksums"  # {file name: block record (platform/checksums.py)} of every file a task reads
)
FORMAT = "megamft-indexed/1"
OUTPUT_KIND = "megamft-preprocess"  # the output_folder marker's kind for a preprocess --out folder
_TASK_KEYS = ("name", "id", "documents", "tokens", "prefix", "loss_mask_prefix", "task_id_prefix")


class DataIntegrityError(UserError, ValueError):
    """A preprocessed data folder that is missing, damaged or inconsistent; the message names the file."""


def rerun_hint(folder: str | Path) -> str:
    return f"re-run megamft-preprocess --out {folder} with the same inputs to rebuild it"


def read_manifest(path: Path) -> dict | None:
    """The manifest at `path` if it is a readable megamft-preprocess manifest, else None."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def load_manifest(folder: str | Path, option: str = "data.path") -> dict:
    """The manifest of a finished output folder; DataIntegrityError saying what to do otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        partial = any(folder.glob("*.partial")) if folder.is_dir() else False
        state = (
            "holds only the .partial files of a run that did not finish"
            if partial
            else "does not exist"
            if not folder.exists()
            else "is not a finished megamft-preprocess output"
        )
        raise DataIntegrityError(
            f"{option}={folder}: no {MANIFEST}; the folder {state}. "
            f"Run megamft-preprocess --out {folder} first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataIntegrityError(f"{path} cannot be read ({err}); {rerun_hint(folder)}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataIntegrityError(f"{path}: {problem}; {rerun_hint(folder)}")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"not a megamft-preprocess manifest (format {FORMAT!r} expected)"
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        return "no 'tasks' list"
    for index, task in enumerate(tasks):
        missing = [k for k in _TASK_KEYS if not isinstance(task, dict) or k not in task]
        if missing:
            return f"tasks[{index}] has no {', '.join(missing)}"
        if any(
            Path(str(task[k])).name != str(task[k])
            for k in ("prefix", "loss_mask_prefix", "task_id_prefix")
        ):
            return f"tasks[{index}] names a file outside the folder"
    if not isinstance(manifest.get("tokenizer"), dict) or "vocab_size" not in manifest["tokenizer"]:
        return "no tokenizer vocab_size"
    if manifest.get("token_dtype") not in ("uint16", "int32"):
        return f"unknown token_dtype {manifest.get('token_dtype')!r}"
    return _checksums_problem(manifest)


def _checksums_problem(manifest: dict) -> str | None:
    if CHECKSUMS not in manifest:
        return None
    records = manifest[CHECKSUMS]
    if not isinstance(records, dict):
        return f"'{CHECKSUMS}' is not a table of files"
    for entry in manifest["tasks"]:
        for name in task_files(entry):
            if not is_record(records.get(name)):
                return f"'{CHECKSUMS}' has no valid record of {name}"
    return None


def task_files(entry: dict) -> list[str]:
    """The six file names of one task of a manifest."""
    return [
        entry[key] + suffix
        for key in ("prefix", "loss_mask_prefix", "task_id_prefix")
        for suffix in (".bin", ".idx")
    ]
