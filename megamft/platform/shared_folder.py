"""Check that every rank sees the same folder: a folder on a node's own disk looks writable from each node.

Rank 0 writes a probe file with a random name and content into the folder;
every rank reads it back. A rank on a node where the folder is a local disk (or
another mount) does not find it, or finds other content. The hosts of such ranks
are gathered, and every rank raises the same error naming them. A fresh random
name is what makes the check reliable over NFS: no node can have it in a cache
of names looked up before.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import torch

from megamft.errors import UserError
from megamft.platform import distributed

PROBE_PREFIX = ".megamft-shared-"


class NotSharedError(UserError, RuntimeError):
    """A folder that some ranks do not see as rank 0 wrote it."""


def write_probe(folder: Path) -> tuple[str | None, str]:
    """(name, content) of the probe written, or (None, why not)."""
    token = uuid.uuid4().hex
    name, content = f"{PROBE_PREFIX}{token}", f"{token} {socket.gethostname()}\n"
    try:
        (folder / name).write_text(content)
    except OSError as err:
        return None, err.strerror or str(err)
    return name, content


def sees_probe(folder: Path, name: str, content: str) -> bool:
    try:
        return (folder / name).read_text() == content
    except OSError:
        return False


def confirm_shared(folder: str | Path, what: str, view: str | Path | None = None) -> None:
    """Raise NotSharedError on every rank unless every rank sees rank 0's probe in `folder` (collective).

    `what` names the folder in the error (e.g. the config key). `view` is where this rank
    looks for the folder instead of `folder`: tests use it to stand for a node that has its
    own folder at that path.
    """
    group, rank = distributed.host_group(), torch.distributed.get_rank()
    probe = [None]
    if rank == 0:
        probe = [write_probe(Path(folder))]
    torch.distributed.broadcast_object_list(probe, src=0, group=group)
    name, content = probe[0]
    if name is None:
        raise NotSharedError(f"{what} {folder} cannot be written ({content})")
    try:
        seen = [None] * torch.distributed.get_world_size()
        me = (
            socket.gethostname(),
            sees_probe(Path(view if view is not None else folder), name, content),
        )
        torch.distributed.all_gather_object(seen, me, group=group)
    finally:
        if rank == 0:
            (Path(folder) / name).unlink(missing_ok=True)
    blind = {}
    for rank, (host, ok) in enumerate(seen):
        if not ok:
            blind.setdefault(host, []).append(rank)
    if blind:
        where = "; ".join(
            f"{host} (ranks {', '.join(map(str, ranks))})" for host, ranks in blind.items()
        )
        raise NotSharedError(
            f"{what} {folder} is not the same folder on every node: rank 0 wrote a file there that these do "
            f"not see: {where}. {what} must be on a file system shared by every node (NFS, Lustre, GPFS...), "
            "mounted at the same path"
        )
