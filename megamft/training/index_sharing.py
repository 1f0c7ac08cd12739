"""Which process writes the training index cache, decided once at start-up by every rank together.

Rank 0 creates the cache folder and writes a probe file with a fresh random name there; every rank looks
for it in its own view of the folder. Ranks that see it share rank 0's folder, and rank 0 writes for them.
On a node that does not see it, the folder is that node's own disk: the node's first rank writes there for
the node's ranks. A builder that cannot write its folder leaves its ranks to build the index in memory.
Everyone else memory-maps what its builder wrote (megamft.data.train_index).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import torch

from megamft.config import DataConfig
from megamft.data.index_plan import cache_root
from megamft.data.train_index import IndexSharing
from megamft.platform import distributed
from megamft.platform.shared_folder import sees_probe, write_probe

log = logging.getLogger("megamft")


def _writable(folder: Path) -> tuple[str | None, str]:
    """(probe name, content) written into `folder` (created if need be), or (None, why not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return None, err.strerror or str(err)
    return write_probe(folder)


def index_sharing(cfg: DataConfig) -> IndexSharing:
    """This rank's part in building the index cache (collective: every rank calls it)."""
    group, rank = distributed.host_group(), torch.distributed.get_rank()
    speaks = distributed.is_logging_rank()
    folder = cache_root(cfg)
    if folder is None:
        return IndexSharing(builder=True, speaks=speaks, use_cache=False)

    def wait() -> None:
        torch.distributed.barrier(group=group)

    probe = [_writable(folder) if rank == 0 else None]
    torch.distributed.broadcast_object_list(probe, src=0, group=group)
    name, content = probe[0]
    if name is None:
        if speaks:
            log.warning(
                "data.index_cache=%s cannot be written (%s): every rank builds the training index in memory; "
                "set data.index_cache to a writable folder",
                folder,
                content,
            )
        return IndexSharing(builder=True, wait=wait, speaks=speaks, use_cache=False)
    try:
        seen = [None] * torch.distributed.get_world_size()
        host = socket.gethostname()
        torch.distributed.all_gather_object(
            seen, (host, sees_probe(folder, name, content)), group=group
        )
        if seen[rank][1]:
            builder = 0
        else:  # this node's own folder: its first rank writes it
            builder = min(r for r, (h, ok) in enumerate(seen) if h == host and not ok)
        mine = _writable(folder) if builder == rank and rank != 0 else (True, "")
        if mine[0] not in (None, True):
            (folder / mine[0]).unlink(missing_ok=True)
        able = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(able, mine[0] is not None, group=group)
    finally:
        if rank == 0:
            (folder / name).unlink(missing_ok=True)
    return IndexSharing(
        builder=builder == rank,
        wait=wait,
        speaks=speaks or builder == rank,
        use_cache=bool(able[builder]),
    )
