"""Rank functions for the platform tests (run on real processes by megamft.testing.distributed.launch)."""

from __future__ import annotations

import logging
import os

from megamft.config import load_config


def shared_folder_check(folder: str, own_folder_rank: int | None, own_folder: str) -> str | None:
    """confirm_shared on `folder`; rank `own_folder_rank` sees `own_folder` at that path instead, as a node
    whose save_dir is its own disk does. Returns the error every rank raised, or None."""
    from megamft.platform import distributed
    from megamft.platform.shared_folder import NotSharedError, confirm_shared

    distributed.initialize(load_config([], []))
    try:
        rank = int(os.environ["RANK"])
        confirm_shared(
            folder, "checkpoint.save_dir", view=own_folder if rank == own_folder_rank else None
        )
        return None
    except NotSharedError as err:
        return str(err)
    finally:
        distributed.shutdown()


def device_connections_after_start(
    overrides: list[str], preset: dict[int, str]
) -> tuple[str | None, list[str]]:
    """CUDA_DEVICE_MAX_CONNECTIONS once distributed.initialize has run in a process started without it
    (rank r starts with preset[r] if given), and the warnings megamft logged."""
    from megamft.platform import distributed

    rank = int(os.environ["RANK"])
    if rank in preset:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = preset[rank]
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megamft").addHandler(handler)
    distributed.initialize(load_config([], overrides))
    try:
        return os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"), warnings
    finally:
        distributed.shutdown()
