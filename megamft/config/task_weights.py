"""Task weights that leave at least one task to learn from, checked against the data's task names.

The names are known before anything starts for preprocessed data (its
manifest.json, read by validation) and once the data is read otherwise; both
places use these functions, so a mistake reads the same either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from megamft.config.schema import DataConfig, LossConfig


def sampling_weight_problems(data: DataConfig, tasks: list[str]) -> list[str]:
    """data.task_sampling_weights (with task_sampling=weights): names of real tasks, one of them weighted."""
    if data.task_sampling != "weights" or not data.task_sampling_weights:
        return []
    weights = data.task_sampling_weights
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        return [
            f"data.task_sampling_weights names unknown task(s) {unknown}; the data's tasks are {tasks}"
        ]
    if not any(weights.get(name, 0.0) > 0 for name in tasks):
        return [
            f"data.task_sampling_weights gives no task a weight > 0 (tasks it does not name weigh 0): no "
            f"sample would be drawn; give one of {tasks} a positive weight"
        ]
    return []


def loss_weight_problems(loss: LossConfig, data: DataConfig, tasks: list[str]) -> list[str]:
    """loss.task_weights: names of real tasks, and a weight > 0 for at least one task that is sampled."""
    unknown = sorted(set(loss.task_weights) - set(tasks))
    if unknown:
        return [f"loss.task_weights names unknown task(s) {unknown}; the data's tasks are {tasks}"]
    sampled = [
        name
        for name in tasks
        if data.task_sampling != "weights" or data.task_sampling_weights.get(name, 0) > 0
    ]
    if sampled and not any(loss.task_weights.get(name, 1.0) > 0 for name in sampled):
        which = "every task" if len(sampled) == len(tasks) else f"every sampled task ({sampled})"
        return [
            f"loss.task_weights gives {which} weight 0: nothing would be learned; give one a weight > 0 "
            "(tasks it does not name weigh 1)"
        ]
    return []


def manifest_task_names(folder: str | None) -> list[str] | None:
    """The task names of a megamft-preprocess output folder, or None when they cannot be read here (the
    data load then names what is wrong with the folder)."""
    try:
        tasks = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))["tasks"]
        return [str(task["name"]) for task in sorted(tasks, key=lambda task: task["id"])]
    except (OSError, ValueError, TypeError, KeyError):
        return None
