"""run_manifest.json in checkpoint.save_dir: what a run found at start-up that its checkpoints do not say.

One JSON object of sections (``data``: what the sequences leave out of the data,
see megamft.data.coverage). Each start rewrites its sections whole, atomically
(a temporary file renamed over the old one), so a kill never leaves half a file;
sections written by others are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_MANIFEST = "run_manifest.json"


def read_run_manifest(save_dir: str | Path) -> dict:
    """The manifest's sections ({} when there is none or it cannot be read)."""
    try:
        manifest = json.loads((Path(save_dir) / RUN_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_section(save_dir: str | Path, section: str, record: dict) -> Path:
    """Set one section of save_dir's run manifest, atomically."""
    path = Path(save_dir) / RUN_MANIFEST
    manifest = read_run_manifest(save_dir)
    manifest[section] = record
    partial = path.with_name(f".{RUN_MANIFEST}.partial")
    with open(partial, "w", encoding="utf-8") as stream:
        json.dump(manifest, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)
    return path
