"""Rank functions for the data tests (run on real processes by megamft.testing.distributed.launch)."""

from __future__ import annotations

import os

from megamft.config import load_config


def index_rows(folder: str, caches: list[str], count: int) -> dict:
    """The first `count` training rows as rank RANK sees them, with data.index_cache=caches[RANK]
    (the same path for ranks sharing a folder, another for a node with its own): whether this rank
    built the index, and the rows."""
    from megamft.data.dataset import load_data
    from megamft.platform import distributed
    from megamft.training.index_sharing import index_sharing

    rank = int(os.environ["RANK"])
    cfg = load_config(
        None,
        [
            "data.source=indexed",
            f"data.path={folder}",
            f"data.index_cache={caches[rank]}",
            "data.seq_length=64",
            "data.valid_samples_per_task=3",
            "data.pack_window=16",
            "data.epoch_samples=50",
        ],
    )
    distributed.initialize(cfg)
    try:
        sharing = index_sharing(cfg.data)
        data = load_data(cfg.data, sharing)
        rows = [
            tuple(zip(t.tolist(), d.tolist())) for t, d in (data.train.row(p) for p in range(count))
        ]
        return {"builder": sharing.builder, "rows": rows}
    finally:
        distributed.shutdown()
