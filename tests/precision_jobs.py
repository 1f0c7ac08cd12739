"""Functions that the precision tests run on real processes (megamft.testing.launch)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).parent)
)  # ranks load this file by path; jobs.py lies beside it

from jobs import first_batches, tiny_config  # noqa: E402


def first_step_main_gradients(
    weights: str, precision: str, overrides: tuple[str, ...] = ()
) -> dict:
    """Train one step from `weights` at `precision`; return the optimizer's main gradients by parameter name.

    The main gradients are the fp32 copies the optimizer steps with, after it has
    divided out any loss scale, so an fp16 run's must equal an fp32 run's.
    """
    import itertools

    from megamft.checkpoint import dist_checkpoint
    from megamft.data.dataset import load_data
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import train_step

    cfg = tiny_config(f"train.precision={precision}", "data.mode=pad", *overrides)
    runtime = distributed.initialize(cfg)
    try:
        data = load_data(cfg.data)
        state = build_training_state(cfg, runtime, data.vocab_size)
        dist_checkpoint.load(state, weights, cfg, load_optimizer=False)
        stats = train_step(state, first_batches(data, 8, 2), data.task_names)
        names = {p: n for n, p in dist_checkpoint.bare_model(state.chunks[0]).named_parameters()}
        grads = {}
        for optimizer in state.optimizer.chained_optimizers:  # megatron's DistributedOptimizer(s)
            model_params = itertools.chain(
                *optimizer.model_float16_groups, *optimizer.model_fp32_groups
            )
            main_params = itertools.chain(
                *optimizer.shard_fp32_from_float16_groups, *optimizer.shard_fp32_groups
            )
            grads.update(
                {
                    names[p]: main.grad.detach().float().cpu().clone()
                    for p, main in zip(model_params, main_params)
                }
            )
        return {
            "grads": grads,
            "grad_norm": stats.grad_norm,
            "loss_scale": stats.loss_scale,
            "skipped": stats.skipped,
        }
    finally:
        distributed.shutdown()


def train_with_fused_adam(kind: str, overrides: tuple[str, ...]) -> dict:
    """jobs.train with megatron-core using a stand-in of TE's or apex's fused Adam (optimizer_standins)."""
    import optimizer_standins
    from jobs import train

    optimizer_standins.install(kind)
    return train(overrides)


def garbage_collections(overrides: tuple[str, ...]) -> dict:
    """jobs.train, recording every garbage collection Python starts while it trains (by generation)."""
    import gc

    from jobs import train

    from megamft.training import steps

    seen = {"during_training": []}
    inside = {"on": False}
    original = steps.run_steps

    def marked(*args, **kwargs):  # marks the training loop's span; the loop itself runs unchanged
        inside["on"] = True
        try:
            return original(*args, **kwargs)
        finally:
            inside["on"] = False

    def record(phase, info):
        if phase == "start" and inside["on"]:
            seen["during_training"].append(info["generation"])

    steps.run_steps = marked
    gc.callbacks.append(record)
    try:
        result = train(overrides)
    finally:
        gc.callbacks.remove(record)
    return {"collections": seen["during_training"], "loss": result["loss"]}
