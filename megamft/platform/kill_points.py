"""Kill points for fault-injection tests: SIGKILL this process at a named moment, or hold it there.

    MEGAMFT_KILL_AT=save.written@6 megamft train ...   # dies once iteration 6's shards are written
    MEGAMFT_STALL_AT=save.writing@2:5 MEGAMFT_STALL_MARKER=/tmp/m megamft train ...
        # iteration 2's background checkpoint writer touches /tmp/m, then waits 5 s before writing

Production code marks its moments with `kill_point(name, iteration)`; without
the variable this is one dictionary lookup. A test chooses seeded moments (after
a step's update, and at each phase of a save) and checks that re-running the
same command resumes from a complete checkpoint and reproduces the loss curve.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "MEGAMFT_KILL_AT"
STALL_ENV = "MEGAMFT_STALL_AT"
STALL_MARKER_ENV = "MEGAMFT_STALL_MARKER"

# In the order they happen within one iteration.
MOMENTS = (
    "step.done",  # the optimizer step is applied, nothing saved yet
    "save.started",  # the .partial folder exists
    "save.written",  # every shard is written, not yet renamed
    "save.published",  # renamed into place, `latest` not yet moved
    "save.pointed",  # `latest` names the new checkpoint, old ones not yet pruned
)
ASYNC_MOMENTS = (
    "save.writing",  # an asynchronous save's background writer is about to write (async saves only)
)
# Other commands' moments, numbered by their own progress.
COMMAND_MOMENTS = (
    "preprocess.chunk",  # megamft-preprocess received chunk N (from 1) of a task, not yet written
    "export.layer",  # megatron-to-hf has converted layer N (from 0) into its temporary folder
    "eval.problem",  # megamft eval has recorded problem N (from 0) in its results
)


def kill_point(name: str, iteration: int) -> None:
    """Die here (SIGKILL, no clean-up) if MEGAMFT_KILL_AT names this moment of this iteration; wait here
    if MEGAMFT_STALL_AT does (a window in which a test can act, e.g. signal a save in flight)."""
    wanted = os.environ.get(ENV)
    if wanted and wanted == f"{name}@{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
    stall = os.environ.get(STALL_ENV, "")
    moment, _, seconds = stall.partition(":")
    if stall and moment == f"{name}@{iteration}":
        marker = os.environ.get(STALL_MARKER_ENV)
        if marker:
            Path(marker).touch()
        time.sleep(float(seconds or 5))
