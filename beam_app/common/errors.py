"""What a command's exit status means, and the one error for a command line
that cannot run as given.

A scheduler tells the two failures apart by the status alone: 2 means fix the
command line (an unknown flag, a bad value, a missing input), 1 means the job
ran and a check it makes failed (counts that do not add up, differences above
a threshold)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

EXIT_STATUS_HELP = "Exit status: 0 done, 1 a check failed (the summary says which), 2 a usage error (the message says what to fix)."


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to pass instead."""
