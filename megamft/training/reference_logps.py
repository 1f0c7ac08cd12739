"""Reference log-probabilities of every pair: computed once before the first step, kept in the run folder.

DPO and RPO compare the policy with a reference; by default the reference is the
model the run starts from, so its log-probability of every answer is computed
in one forward-only pass over all pairs (each DP rank a share, at the run's
TP/PP) and written beside the checkpoints as `reference_logps.npz` with a key:
the digest of the data's identity, the starting model's and the objective's
inputs. A resumed run reads it back; the key must match, since the starting
model is no longer there to recompute it (with LoRA it is: the base with the
adapters off, `adapters_disabled`). Written to a temporary name and renamed,
so that a killed run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megamft.errors import UserError

FILE = "reference_logps.npz"


class ReferenceMismatch(UserError, RuntimeError):
    """The stored reference log-probabilities belong to other data or another starting model."""


def reference_key(identity: dict) -> str:
    """The digest of what the reference depends on: {"data": ..., "model": ..., ...}, JSON-serializable."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load(folder: str | Path, identity: dict) -> dict[int, np.ndarray] | None:
    """The stored log-probabilities per task ([pairs, 2] float64), None if there are none; refused if the key differs."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    with np.load(path) as stored:
        saved = json.loads(str(stored["identity"]))
        if str(stored["key"]) != reference_key(identity):
            changed = sorted(
                k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k)
            )
            raise ReferenceMismatch(
                f"{path}: the reference log-probabilities were computed for other "
                f"{', '.join(changed) or 'inputs'}; use the data and reference model they were "
                "computed with (a resumed run cannot recompute them: its starting model is gone), "
                "or another checkpoint.save_dir; before the run's first checkpoint, delete the "
                "file to recompute it"
            )
        return {
            int(name.split("_")[1]): stored[name]
            for name in stored.files
            if name.startswith("task_")
        }


def save(folder: str | Path, identity: dict, logps: dict[int, np.ndarray]) -> Path:
    """Write atomically (temporary name, fsync, rename): a complete file or none."""
    path = Path(folder) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{FILE}.partial")
    with open(partial, "wb") as f:
        np.savez(
            f,
            key=np.array(reference_key(identity)),
            identity=np.array(json.dumps(identity, sort_keys=True)),
            **{f"task_{task}": values for task, values in logps.items()},
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def compute(
    state,
    pairs: list[tuple[int, int]],
    pairs_per_task: list[int],
    make_batch,
    pairs_per_micro_batch: int,
    fused: bool = False,
) -> dict[int, np.ndarray]:
    """Every pair's log-probabilities under the model as it is, on every rank (`fused`: through the
    fused cross entropy, loss.fused_cross_entropy).

    pairs: every (task, pair) of the data; make_batch(list of pairs) gives their micro-batch.
    Each DP rank computes a strided share; one all-reduce over DP and one broadcast from the
    last pipeline stage give everyone the whole table.
    """
    from megamft.training.step import reference_logps

    rank, size = (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    offsets = np.concatenate([[0], np.cumsum(pairs_per_task)])
    table = torch.zeros(int(offsets[-1]), 2, dtype=torch.float64)
    mine = pairs[rank::size]
    cuts = [mine[i : i + pairs_per_micro_batch] for i in range(0, len(mine), pairs_per_micro_batch)]
    per_rank = -(-len(pairs) // size)
    rounds = -(-per_rank // pairs_per_micro_batch)  # the same on every rank: collectives match
    for index in range(
        rounds
    ):  # one micro-batch per schedule; a rank with fewer repeats one, unread
        cut = cuts[index] if index < len(cuts) else (cuts or [pairs[:1]])[-1]
        for values in reference_logps(state, [make_batch(cut)], len(pairs_per_task), fused):
            if index < len(cuts):
                table[torch.tensor([int(offsets[task]) + pair for task, pair in cut])] = values
    _share(table)
    return {
        task: table[offsets[task] : offsets[task + 1]].numpy()
        for task in range(len(pairs_per_task))
    }


def _share(table: torch.Tensor) -> None:
    """Sum the ranks' shares over DP (each pair was computed by one rank), then copy the last stage's."""
    device_table = table.to(torch.cuda.current_device())
    torch.distributed.all_reduce(device_table, group=parallel_state.get_data_parallel_group())
    torch.distributed.broadcast(
        device_table,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    table.copy_(device_table.cpu())


def obtain(
    folder: str | Path, identity: dict, compute_all, may_compute: bool
) -> tuple[dict[int, np.ndarray], bool]:
    """(table, computed): the stored table if its key matches; else computed (fresh runs only) and
    stored by the first rank."""
    stored = load(folder, identity)
    if stored is not None:
        return stored, False
    if not may_compute:
        raise ReferenceMismatch(
            f"{Path(folder) / FILE} is missing: a resumed run cannot recompute the reference "
            "log-probabilities of the model it started from; restore the file or start anew"
        )
    logps = compute_all()
    if torch.distributed.get_rank() == 0:
        save(folder, identity, logps)
    torch.distributed.barrier()
    return logps, True


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model, LoRA adapters off (scale 0), for the duration: the reference of a LoRA run, no copy."""
    from megamft.model.lora import lora_modules

    modules = [module for _, module in lora_modules(model)]
    scales = [module.lora_scale for module in modules]
    for module in modules:
        module.lora_scale = 0.0
    try:
        yield
    finally:
        for module, scale in zip(modules, scales):
            module.lora_scale = scale
