"""What an evaluation evaluated, by content: the model's weights and config, and the tokenizer's files.

settings.json of an evaluation records both; rerunning into the same --output with another
model (another checkpoint exported to the same folder, a save folder whose `latest` moved on,
other tokenizer files) is refused, naming what differs, while the same model under another
path resumes. Every weights file is hashed (platform/checksums.py, several threads at once):
about 1.5 s per GB per core on a 2-core VM, small beside loading the model for generation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megamft.platform.checksums import folder_digests

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NOT_THE_MODEL = ("_name_or_path", "transformers_version")  # where and by what it was saved


def model_identity(folder: Path) -> dict[str, str]:
    """{file: digest} of the folder's weights files and of config.json (less the keys naming where it came from)."""
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    identity = folder_digests(weights)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = (
        {k: v for k, v in config.items() if k not in _NOT_THE_MODEL}
        if isinstance(config, dict)
        else config
    )
    identity["config.json"] = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()
    return identity


def tokenizer_identity(tokenizer) -> dict[str, str]:
    """{file: digest} of the files the tokenizer was read from (its kind, for one that has none)."""
    files = list(getattr(tokenizer, "files", ()))
    return (
        folder_digests(files)
        if files
        else {"kind": json.dumps(tokenizer.identity(), sort_keys=True)}
    )


def identity_differences(saved: dict, now: dict) -> list[str]:
    """What differs between two evaluations' identities, as 'the model (files) differs'."""
    differences = []
    for part in ("model", "tokenizer"):
        before, after = saved.get(part, {}), now.get(part, {})
        files = [
            name for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)
        ]
        if files:
            differences.append(f"the {part} differs ({', '.join(files)})")
    return differences
