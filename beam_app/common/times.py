"""The one reader of time flags: every command that takes a time takes a UTC
date (2013-11-01, its midnight) or an RFC 3339 time (2013-11-01T06:30:00Z).
A time without an offset is read as UTC, as a date is."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from beam_app.common.errors import UsageError
from transforms.events import datetime_to_time_us, time_us_to_rfc3339
from transforms.spec import SpecError, parse_utc_date

TIME_HELP = "a UTC date (2013-11-01) or an RFC 3339 time (2013-11-01T06:30:00Z)"


def parse_time(text: str, flag: str) -> dt.datetime:
    """`text` as an aware UTC datetime, read as a spec reads its dates; UsageError naming `flag`
    when it is neither form."""
    try:
        value = parse_utc_date(str(text).strip(), flag)
    except SpecError:
        raise UsageError(f"{flag}: expected {TIME_HELP}, got {text!r}") from None
    return value.astimezone(dt.timezone.utc)


def time_flag_us(text: Optional[str], flag: str) -> Optional[int]:
    """A time flag's value in microseconds since the epoch; None when the flag is not given."""
    return None if text is None else datetime_to_time_us(parse_time(text, flag))


def time_flag_rfc3339(text: Optional[str], flag: str) -> Optional[str]:
    """A time flag's value as RFC 3339 with Z (how tables and files write times); None when not given."""
    time_us = time_flag_us(text, flag)
    return None if time_us is None else time_us_to_rfc3339(time_us)


def time_range_us(start: Optional[str], end: Optional[str], what: str = "") -> tuple[Optional[int], Optional[int]]:
    """--start and --end as a half-open range [start, end) in microseconds; UsageError when it is empty."""
    start_us, end_us = time_flag_us(start, "--start"), time_flag_us(end, "--end")
    if start_us is not None and end_us is not None and end_us <= start_us:
        raise UsageError(f"--end ({end}) must be after --start ({start}){what}")
    return start_us, end_us


def add_time_range_arguments(parser, what: str) -> None:
    """--start and --end: the half-open range [start, end) of request times a job
    answers (`what`: the job's verb phrase, e.g. "Score the requests")."""
    parser.add_argument(
        "--start", default=None, metavar="TIME",
        help=f"{what} at or after this time: {TIME_HELP}. Observations before it still feed the windows "
             "(the events read start the longest window earlier). Default: from the first request.")
    parser.add_argument(
        "--end", default=None, metavar="TIME",
        help=f"{what} before this time (same forms; excluded). Default: to the last.")
