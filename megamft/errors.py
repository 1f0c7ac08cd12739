"""The one exception type for a user's mistake.

A ``UserError`` says what was wrong in what the user gave (a config key, a file and
line, a folder, an argument) and what to do, in its message. The command-line
entry points print that message as one line and exit non-zero, without a
traceback; any other exception is megamft's own bug and keeps its traceback.
Every module-specific error class for bad input derives from it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names it and says what to do."""
