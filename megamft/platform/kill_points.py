"""Kill points for fault-injection tests: SIGKILL this process at a named moment.

    MEGAMFT_KILL_AT=save.written@6 megamft train ...   # dies once iteration 6's shards are written

Production code marks its moments with `kill_point(name, iteration)`; without
the variable this is one dictionary lookup. A test chooses seeded moments (after
a step's update, and at each phase of a save) and checks that re-running the
same command resumes from a complete checkpoint and reproduces the loss curve.
"""

from __future__ import annotations

import os
import signal

ENV = "MEGAMFT_KILL_AT"

# In the order they happen within one iteration.
MOMENTS = (
    "step.done",        # the optimizer step is applied, nothing saved yet
    "save.started",     # the .partial folder exists
    "save.written",     # every shard is written, not yet renamed
    "save.published",   # renamed into place, `latest` not yet moved
    "save.pointed",     # `latest` names the new checkpoint, old ones not yet pruned
)


def kill_point(name: str, iteration: int) -> None:
    """Die here (SIGKILL, no clean-up) if MEGAMFT_KILL_AT names this moment of this iteration."""
    wanted = os.environ.get(ENV)
    if wanted and wanted == f"{name}@{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
