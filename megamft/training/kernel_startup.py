"""The fused cross-entropy kernels made ready before training: built once per node, used by all ranks or none.

Training calls ``prepare_fused_kernels`` on CUDA with loss.fused_cross_entropy=true,
after the process groups exist and before the model is built:

1. local rank 0 of each node builds the extension, or loads it from its folder
   (``build``: fused_ce_build.build_extension);
2. every rank waits at a barrier over a gloo group of all ranks made for it: no
   GPU work, and a timeout (``wait_s``) long enough for a build that first waits
   out a stale lock (the host group's, torch's default 30 minutes, is not);
3. the other ranks load the extension that rank built (``load``:
   fused_ce_build.load_extension, which never builds);
4. all ranks exchange their outcome. The kernels are used only if every rank
   loaded them; otherwise every rank runs the torch path, so that no rank runs
   kernels another lacks, and the reporting rank warns once, with the reason of
   the first rank that failed to build (else to load).

``build`` and ``load`` return the module or raise: ToolkitMissing / KernelsNotBuilt
(what is missing) or any other exception (a build error).
"""

from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from megamft.loss import fused_ce
from megamft.loss.fused_ce_build import build_extension, failure_reason, load_extension
from megamft.platform.build_lock import STALE_AFTER_S

log = logging.getLogger(__name__)
WAIT_S = 2 * STALE_AFTER_S + 600  # a builder may wait out another's stale lock, then build


@dataclass(frozen=True)
class Attempt:
    """One rank's outcome."""

    rank: int
    host: str
    built: bool  # this rank ran the build (local rank 0)
    problem: str | None  # why this rank has no kernels; None: it loaded them
    folder: str | None  # where the loaded library lies


@dataclass(frozen=True)
class KernelDecision:
    """What every rank agreed on."""

    use_kernels: bool
    builders: list[int]  # the ranks that built (or loaded from their folder first): one per node
    reason: str | None  # why the torch path runs
    folder: str | None  # the reporting rank's kernel folder (when used)


def _attempt(step: Callable[[], ModuleType]) -> tuple[ModuleType | None, str | None]:
    try:
        return step(), None
    except Exception as exc:  # noqa: BLE001 - every failure means the torch path, on every rank
        return None, failure_reason(exc)


def _decide(attempts: list[Attempt], me: Attempt) -> KernelDecision:
    failed = [a for a in attempts if a.problem is not None]
    builders = [a.rank for a in attempts if a.built]
    if not failed:
        return KernelDecision(True, builders, None, me.folder)
    first = min(failed, key=lambda a: (not a.built, a.rank))
    reason = f"rank {first.rank} on {first.host}{' (which built)' if first.built else ''}: {first.problem}"
    return KernelDecision(False, builders, reason, None)


def prepare_fused_kernels(
    local_rank: int,
    report: bool,
    build: Callable[[], ModuleType] = build_extension,
    load: Callable[[], ModuleType] = load_extension,
    wait_s: float = WAIT_S,
) -> KernelDecision:
    """Steps 1-4 of the module docstring; every rank calls it, once the process group exists.

    The agreed module (or None) is handed to fused_ce.adopt_kernels; `report`: this rank logs the outcome.
    """
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
    try:
        decision = _prepare(group, local_rank, build, load)
    finally:
        torch.distributed.destroy_process_group(group)
    if report and decision.use_kernels:
        log.info(
            "fused cross entropy: CUDA kernels from %s (built or loaded by ranks %s, loaded by the others)",
            decision.folder,
            decision.builders,
        )
    elif report:
        fused_ce.warn_fallback(decision.reason)
    return decision


def _prepare(
    group, local_rank: int, build: Callable[[], ModuleType], load: Callable[[], ModuleType]
) -> KernelDecision:
    rank = torch.distributed.get_rank()
    module, problem = None, None
    if local_rank == 0:
        log.info(
            "rank %d: building or loading the fused cross-entropy kernels for this node (a first build takes "
            "minutes; `megamft build-kernels` prebuilds them)",
            rank,
        )
        module, problem = _attempt(build)
    torch.distributed.barrier(group=group)
    if local_rank != 0:
        module, problem = _attempt(load)
    folder = str(Path(module.__file__).parent) if module is not None else None
    me = Attempt(rank, socket.gethostname(), local_rank == 0, problem, folder)
    attempts = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(attempts, me, group=group)
    decision = _decide(attempts, me)
    fused_ce.adopt_kernels(module if decision.use_kernels else None)
    return decision
