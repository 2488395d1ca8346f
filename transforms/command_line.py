"""Command-line parsing every command shares (beam_app's and models.train):
an unknown flag is an error that names the closest known one, and usage
errors exit 2."""

from __future__ import annotations

import argparse
import atexit
import difflib
import os
import re
import sys
import threading
from typing import Optional, Sequence

EXIT_STATUS_HELP = ("Exit status: 0 done, 1 a check failed (the summary says which), "
                    "2 a usage error (the message says what to fix).")


def closest_flag(flag: str, known: Sequence[str]) -> Optional[str]:
    """The known flag a mistyped one most resembles (None when nothing is close)."""
    matches = difflib.get_close_matches(flag.split("=", 1)[0], list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_flag_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    """What the user sees for arguments no parser took: the first, and the flag meant."""
    first = next((arg for arg in unknown if arg.startswith("-")), unknown[0])
    if not first.startswith("-"):
        return f"unexpected argument {first!r}: every value follows its flag (--flag value or --flag=value)"
    suggestion = closest_flag(first, known)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return f"unknown flag {first.split('=', 1)[0]}{hint} (--help lists the flags)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands without Beam options: no abbreviations (--out is
    not --output), an unknown flag names the closest known one, and usage errors
    exit 2 as argparse's own do."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = [flag for action in self._actions for flag in action.option_strings]
        # Before argparse's own checks: a typo must not be reported as a missing required flag.
        typos = [arg for arg in args if arg.startswith("--") and arg.split("=", 1)[0] not in known and arg != "--"]
        if typos:
            self.error(unknown_flag_message(typos, known))
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_flag_message(unknown, known))
        return parsed




# TensorFlow's native start-up lines. TF_CPP_MIN_LOG_LEVEL does not reach them: absl writes every message
# logged before absl::InitializeLog() straight to file descriptor 2, in this process and in every worker
# process the DirectRunner starts (they inherit the descriptor).
_CHATTER = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are on|"
    rb"cudart_stub\.cc|Could not find cuda drivers|failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|"
    rb"computation_placer\.cc|This TensorFlow binary is optimized|TF-TRT Warning|"
    rb"oneDNN supports DT_BOOL only on platforms with AVX-512")
_filter: Optional[tuple[int, threading.Thread]] = None


def quiet_tensorflow() -> None:
    """No TensorFlow start-up chatter on stderr: TF_CPP_MIN_LOG_LEVEL for its Python
    and C++ logs, and a filter on file descriptor 2 for the lines absl writes before
    its logging starts. Everything else written to stderr passes through unchanged.
    Call it first in a command's main, before TensorFlow is imported."""
    global _filter
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _filter is not None:
        return
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as lines:
            pending = b""
            while chunk := lines.read(65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    if not _CHATTER.search(line):
                        os.write(real_stderr, line + b"\n")
            if pending and not _CHATTER.search(pending):
                os.write(real_stderr, pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    _filter = (real_stderr, thread)
    atexit.register(restore_stderr)


def restore_stderr(wait_s: float = 2.0) -> None:
    """Puts the real stderr back and lets the filter write out what it holds (a
    traceback printed at exit included). Call it before os._exit, which skips atexit."""
    global _filter
    if _filter is None:
        return
    real_stderr, thread = _filter
    _filter = None
    sys.stderr.flush()
    os.dup2(real_stderr, 2)  # closes this process's write end of the pipe: the filter reads to the end
    thread.join(wait_s)  # worker processes may still hold the pipe open: do not wait for them
