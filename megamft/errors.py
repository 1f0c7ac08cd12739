"""The exception types for a user's mistake, and for a rank that stops because another one failed.

A ``UserError`` says what was wrong in what the user gave (a config key, a file and
line, a folder, an argument) and what to do, in its message. The command-line
entry points (megamft.entry_point) print that message as one line and exit 2,
without a traceback; any other exception is megamft's own bug and keeps its
traceback. Every module-specific error class for bad input derives from it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names it and says what to do."""

    rank: int | None = None
    """Set where several ranks run and this one reports the mistake after they connected: the global rank
    that found it (which may be the only one: its own data file, its node's view of a folder)."""


class MissingPackage(UserError, ImportError):
    """An optional package that what the user asked for needs is not installed; the message says how to."""


class ReportedByAnotherRank(Exception):
    """This rank stopped because another rank failed first and reported why; it has nothing to add.

    Raised from the error this rank met (usually the broken connection to the rank that stopped),
    which MEGAMFT_DEBUG=1 shows.
    """

    def __init__(self, rank: int, user_error: bool):
        self.rank, self.user_error = rank, user_error
        cause = "a mistake in the input" if user_error else "an error"
        super().__init__(
            f"stopped because rank {rank} stopped first on {cause} (reported by that rank)"
        )
