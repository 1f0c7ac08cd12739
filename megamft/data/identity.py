"""A preprocessed data folder's identity: what it holds, not where it lies.

Read from the manifest: one digest per file a task reads (of its recorded block checksums), the
tokenizer and the chat template. A training run saves it with every checkpoint, so that resuming
can tell data rebuilt in place (refused, the changed tasks and files listed) from the same data
moved or copied elsewhere (accepted). verify.py checks that the files hold what their manifest
says; together they identify the data by content. A manifest written before checksums were
recorded has no identity (None): runs on it are compared by data.path, as before.
"""

from __future__ import annotations

import hashlib
import json

from megamft.data.manifest import CHECKSUMS, task_files
from megamft.platform.checksums import record_digest


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def data_identity(manifest: dict) -> dict | None:
    """{"tasks": {task: {file: digest}}, "tokenizer": the manifest's tokenizer identity, "template": digest}."""
    records = manifest.get(CHECKSUMS)
    if not isinstance(records, dict):
        return None
    tasks = {
        entry["name"]: {name: record_digest(records[name]) for name in task_files(entry)}
        for entry in sorted(manifest["tasks"], key=lambda e: e["id"])
    }
    return {
        "tasks": tasks,
        "tokenizer": manifest.get("tokenizer"),
        "template": _digest(manifest.get("template")),
    }


def identity_differences(saved: dict, now: dict) -> list[str]:
    """What differs between two data identities, task by task: [] for the same data."""
    differences = []
    before, after = saved.get("tasks", {}), now.get("tasks", {})
    for task in sorted(set(before) | set(after)):
        if task not in after:
            differences.append(f"task {task} is gone")
        elif task not in before:
            differences.append(f"task {task} is new")
        else:
            changed = [
                name
                for name in sorted(set(before[task]) | set(after[task]))
                if before[task].get(name) != after[task].get(name)
            ]
            if changed:
                differences.append(f"task {task}: {', '.join(changed)} changed")
    if saved.get("tokenizer") != now.get("tokenizer"):
        differences.append("the tokenizer changed")
    if saved.get("template") != now.get("template"):
        differences.append("the chat template changed")
    return differences
