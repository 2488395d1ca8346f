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

from transforms.command_line import EXIT_STATUS_HELP  # noqa: F401 - the commands' --help says it


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to pass instead."""
