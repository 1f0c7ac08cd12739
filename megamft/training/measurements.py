"""What the loop does with a step's measurements: in-training code evaluation, model selection,
saves of the best, early stopping."""

from __future__ import annotations

import logging
from typing import Callable

from megamft.platform import distributed
from megamft.training.selection import validation_scores

log = logging.getLogger("megamft")


def evaluate_code(run, final: bool = False) -> dict[str, float]:
    """eval.problems' pass@k when due at this step (`final`: at the end of training, if not done at this
    step already), logged to every metrics sink; {} otherwise."""
    if run.evaluator is None or not run.evaluator.due(run.iteration, final):
        return {}
    scores = run.evaluator.run(run.state.chunks, run.iteration)
    run.metrics.scalars(run.iteration, scores)
    return scores


def measure(run, validation, save: Callable, final: bool = False) -> None:
    """Offer this step's measurements (a validation's StepStats or None, and the code evaluation due now)
    to `run.selection`; a step that ranks among the kept best is saved now (`save(run)` saves unless this
    step is saved already)."""
    scores = validation_scores(validation) | evaluate_code(run, final)
    if run.selection.observe(run.iteration, scores):
        save(run)


def stops_early(run) -> bool:
    """True (and said once) when train.early_stopping_patience measurements in a row did not improve."""
    if not run.selection.should_stop():
        return False
    run.result.stopped_early = True
    if distributed.is_logging_rank():
        step, score = run.selection.best
        log.info(
            "early stopping after step %d: %s did not improve for %d measurements (best %.4g at step %d)",
            run.iteration,
            run.selection.metric,
            run.selection.stalled,
            score,
            step,
        )
    return True
