"""Shared test helpers: the flights spec and hand-made events."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_GCE_CHECK", "true")  # google-auth must not probe a metadata server

from transforms.events import Event  # noqa: E402
from transforms.spec import load_spec  # noqa: E402

MIN_US = 60_000_000
HOUR_US = 60 * MIN_US


@pytest.fixture(scope="session")
def flights_spec():
    return load_spec("flights")


def request(event_id: str, time_us: int, origin: str = "EWR", carrier: str = "UA", label=None) -> Event:
    return Event(event_id, "request", time_us, {
        "carrier": carrier, "origin": origin, "dest": "ORD", "distance": 719.0, "hour": 8,
        "minute": 0, "month": 1, "day_of_week": 1, "dep_delay": label})


def observation(event_id: str, time_us: int, delay: float, origin: str = "EWR", carrier: str = "UA") -> Event:
    return Event(event_id, "observation", time_us, {"carrier": carrier, "origin": origin, "dep_delay": delay})
