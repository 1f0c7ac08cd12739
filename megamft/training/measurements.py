"""What the loop does with a step's measurements: model selection, saves of the best, early stopping."""

from __future__ import annotations

import logging
from typing import Callable

from megamft.platform import distributed
from megamft.training.selection import validation_scores

log = logging.getLogger("megamft")


def measure(run, validation, save: Callable) -> None:
    """Offer this step's measurements (a validation's StepStats or None) to `run.selection`; a step that
    ranks among the kept best is saved now (`save(run)` saves unless this step is saved already)."""
    scores = validation_scores(validation)
    if run.selection.observe(run.iteration, scores):
        save(run)


def stops_early(run) -> bool:
    """True (and said once) when train.early_stopping_patience measurements in a row did not improve."""
    if not run.selection.should_stop():
        return False
    run.result.stopped_early = True
    if distributed.is_logging_rank():
        step, score = run.selection.best
        log.info("early stopping after step %d: %s did not improve for %d measurements (best %.4g at step %d)",
                 run.iteration, run.selection.metric, run.selection.stalled, score, step)
    return True
