"""The City of Chicago taxi trips (the `chicago_taxi` spec): a row of
beam_app/data/chicago_taxi.csv -> a request at the trip's start and an
observation at its end.

Named by the spec as `beam_app.adapters.chicago_taxi:trip_events`. The
source's quirks are in beam_app/data/README.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from typing import Mapping, Optional

from transforms.adapters import integer, is_missing, number_or_none
from transforms.events import Event, InvalidRecord

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
EARTH_RADIUS_MILES = 3958.8


def trip_events(row: Mapping[str, str]) -> list[Event]:
    """A trip -> [request, observation].

    The request is at `trip_start_timestamp` with what is known as the
    passenger gets in (areas, hour, weekday, payment type, company, the
    distance between the area centroids) and the fare as label; the
    observation at `trip_start_timestamp + trip_seconds` carries the fare,
    miles and seconds. Empty values become None: the spec decides which may
    be missing, and ranges (a zero fare or duration) are checked against it.
    """
    start_s = integer(row, "trip_start_timestamp")
    if is_missing(row.get("trip_seconds")):
        raise InvalidRecord("trip_seconds: missing: the trip has no end to observe")
    trip_seconds = integer(row, "trip_seconds")
    # The timestamps hold Chicago wall-clock time written as UTC: its UTC
    # hour and weekday are the local ones (the source's own hour and day
    # columns agree on every row).
    start = _EPOCH + dt.timedelta(seconds=start_s)
    fare = number_or_none(row, "fare")
    pickup = community_area(row, "pickup_community_area")
    request = Event(
        event_id=trip_id(row, start),
        role="request",
        time_us=start_s * 1_000_000,
        fields={
            "pickup_community_area": pickup,
            "dropoff_community_area": community_area(row, "dropoff_community_area"),
            "trip_start_hour": start.hour,
            "trip_start_day": start.isoweekday() % 7 + 1,  # Sunday = 1, as in the City's data
            "payment_type": _text(row, "payment_type"),
            "company": _text(row, "company"),
            "centroid_distance_miles": centroid_distance_miles(row),
            "fare": fare,  # the label
        },
    )
    miles = number_or_none(row, "trip_miles")
    observation = Event(
        event_id=request.event_id,
        role="observation",
        time_us=(start_s + trip_seconds) * 1_000_000,
        fields={
            "pickup_community_area": pickup,
            "fare": fare,
            "trip_miles": None if miles == 0 else miles,  # a meter's 0: distance not recorded
            "trip_seconds": trip_seconds,
        },
    )
    return [request, observation]


def trip_id(row: Mapping[str, str], start: dt.datetime) -> str:
    """The source has no trip id: the start (readable, sorts by time) and a
    hash of the whole row (no two rows of the file are equal)."""
    digest = hashlib.sha256("\x1f".join(row.values()).encode()).hexdigest()
    return f"{start:%Y%m%dT%H%M}-{digest[:10]}"


def community_area(row: Mapping[str, str], name: str) -> Optional[str]:
    """A community area number (1 to 77) as text, '8' whether written 8 or 8.0."""
    value = number_or_none(row, name)
    if value is None:
        return None
    if value != int(value) or not 1 <= value <= 77:
        raise InvalidRecord(f"{name}: not a community area (1 to 77): {row[name]!r}")
    return str(int(value))


def centroid_distance_miles(row: Mapping[str, str]) -> Optional[float]:
    """Great-circle miles between the pickup and dropoff area centroids, None unless both are known."""
    points = [number_or_none(row, f"{end}_{axis}")
              for end in ("pickup", "dropoff") for axis in ("latitude", "longitude")]
    if any(value is None for value in points):
        return None
    lat1, lon1, lat2, lon2 = map(math.radians, points)
    a = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_MILES * math.asin(math.sqrt(a))


def _text(row: Mapping[str, str], name: str) -> Optional[str]:
    value = row.get(name)
    return None if is_missing(value) else value.strip()
