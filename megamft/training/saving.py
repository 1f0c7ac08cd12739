"""A run's checkpoints: what is saved with the weights, and saving a step once."""

from __future__ import annotations

from megamft.checkpoint import dist_checkpoint
from megamft.training import data_checks
from megamft.training.run_state import Run


def save(run: Run) -> None:
    extra = {"balancer": run.balancer.state_dict()} if run.balancer else {}
    extra["task_samples"] = dict(run.result.task_samples)
    if run.data.template is not None:  # what an export writes as its chat template
        extra["data_template"] = run.data.template
    extra["selection"] = run.selection.state_dict()
    if run.preference is not None:  # a resumed run checks its stored reference against this
        extra["reference_model"] = run.preference.reference_model
    path = dist_checkpoint.save(
        run.state,
        run.cfg.checkpoint.save_dir,
        run.iteration,
        run.consumed,
        run.cfg,
        extra=extra,
        async_saves=run.async_saves,
        lora_base=run.lora_base if run.cfg.lora.save_adapters_only else None,
        data_identity=data_checks.checkpoint_data_identity(run.data),
        keep=run.selection.kept(),
        best=run.selection.best_kept(),
    )
    run.result.last_checkpoint = str(path)


def saved_now(run: Run) -> bool:
    return (run.result.last_checkpoint or "").endswith(f"{run.iteration:07d}")


def save_unless_saved(run: Run) -> None:
    if run.cfg.checkpoint.save_dir and not saved_now(run):
        save(run)
