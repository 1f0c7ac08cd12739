"""Bytes one rank reads to load a checkpoint, against the bytes of the parameters it holds.

Run on every rank under `launch`: ``launch(load_reads, 2, kwargs=dict(checkpoint=..., model_yaml=...,
overrides=("parallel.tensor_model_parallel_size=2",)))``. What is counted is the kernel's
``rchar`` of the process (/proc/self/io): every byte passed through read() calls, whether the
page cache served it or not, so the count does not depend on what an earlier run left cached.
"""

from __future__ import annotations

from pathlib import Path


def bytes_read() -> int:
    """Bytes this process has read so far (files, pipes and sockets alike)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def load_reads(checkpoint: str, model_yaml: str, overrides: tuple[str, ...] = ()) -> dict:
    """This rank's bytes read by `dist_checkpoint.load` of `checkpoint` at the layout `overrides` give,
    and the bytes of the parameters it holds ("read", "held").

    The checkpoint is loaded twice and the second load counted: the first imports what loading
    needs, whose Python files would count otherwise. Nothing is cached between the two loads.
    """
    from megamft.checkpoint import dist_checkpoint
    from megamft.config import load_config
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state

    cfg = load_config(
        [model_yaml], ["train.global_batch_size=2", "train.micro_batch_size=1", *overrides]
    )
    runtime = distributed.initialize(cfg)
    try:
        state = build_training_state(cfg, runtime, cfg.model.vocab_size)
        dist_checkpoint.load(state, checkpoint, cfg, load_optimizer=False)
        before = bytes_read()
        dist_checkpoint.load(state, checkpoint, cfg, load_optimizer=False)
        read = bytes_read() - before
        held = sum(
            p.numel() * p.element_size() for chunk in state.chunks for p in chunk.parameters()
        )
        return {"read": read, "held": held}
    finally:
        distributed.shutdown()
