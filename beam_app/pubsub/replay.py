"""A replay's plan, pure: events read and parsed (dead letters counted), put in
the streaming engine's order, selected (--start, --limit), scheduled by a pacing,
optionally rebased to the wall clock, and each turned into its Pub/Sub message
(the JSON event, with event_time and message_key attributes)."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

from transforms.events import Event, InvalidRecord, RawRecord, event_to_json, time_us_to_rfc3339
from transforms.point_in_time import OBSERVATION, REQUEST

DEFAULT_RATE = 100.0
FIRST_REASONS = 5


class Pacing(NamedTuple):
    """When events go out: `speedup` divides event-time gaps; otherwise `rate`
    events per second, evenly spaced; rate 0 is as fast as possible."""

    rate: float = DEFAULT_RATE
    speedup: Optional[float] = None

    def describe(self) -> str:
        if self.speedup:
            return f"event-time gaps / {self.speedup:g}"
        return f"{self.rate:g} events/s" if self.rate else "as fast as possible"


class Loaded(NamedTuple):
    events: list[Event]
    records: int
    dead_letters: int
    first_reasons: list[str]  # "source: reason" of the first few dead letters


class Selection(NamedTuple):
    events: list[Event]  # in publish order
    before_start: int  # dropped by --start
    beyond_limit: int  # dropped by --limit


class Planned(NamedTuple):
    event: Event  # as it will be published (rebased or not)
    due_us: int  # when to send it, microseconds after the first one


class Message(NamedTuple):
    data: bytes
    attributes: dict[str, str]


def publish_order(event: Event) -> tuple[int, int, str]:
    """The streaming engine's processing order (PendingEvent.order): time, requests
    before observations at equal times, then event_id."""
    return event.time_us, REQUEST if event.role == "request" else OBSERVATION, event.event_id


def load_events(records: Iterable[RawRecord], parse: Callable[[RawRecord], list[Event]]) -> Loaded:
    """Every record through the batch job's parser; those that fail are counted with
    their first reasons (a record fails whole, like a dead letter in batch)."""
    events: list[Event] = []
    count = dead = 0
    reasons: list[str] = []
    for count, record in enumerate(records, start=1):
        try:
            events.extend(parse(record))
        except (InvalidRecord, ValueError) as err:
            dead += 1
            if len(reasons) < FIRST_REASONS:
                reasons.append(f"{record.source}: {err}")
        if count % 100_000 == 0:
            logging.info("loading: %d records, %d events", count, len(events))
    return Loaded(events, count, dead, reasons)


def select(events: list[Event], start_us: Optional[int] = None, limit: Optional[int] = None) -> Selection:
    """The events at or after `start_us`, in publish order, the first `limit` of them."""
    kept = [e for e in events if e.time_us >= start_us] if start_us is not None else list(events)
    kept.sort(key=publish_order)
    selected = kept[:limit] if limit is not None else kept
    return Selection(selected, len(events) - len(kept), len(kept) - len(selected))


def schedule(events: Iterable[Event], pacing: Pacing) -> Iterator[Planned]:
    """Each event with its due time: under --speedup its event-time gap to the first
    event divided by the factor, under --rate i/rate seconds, under rate 0 at once."""
    first_us: Optional[int] = None
    for index, event in enumerate(events):
        if pacing.speedup:
            first_us = event.time_us if first_us is None else first_us
            due_us = round((event.time_us - first_us) / pacing.speedup)
        else:
            due_us = round(index * 1_000_000 / pacing.rate) if pacing.rate else 0
        yield Planned(event, due_us)


def rebase(planned: Iterable[Planned], origin_us: int) -> Iterator[Planned]:
    """Event time := origin + due time, in whole milliseconds (Pub/Sub timestamps
    are). Where rounding would give an event the millisecond of an earlier event
    with an earlier original time, it moves 1 ms later, so publish order and
    event-time order stay the same (only when events are due under 1 ms apart)."""
    origin_ms = (origin_us + 500) // 1000
    previous: Optional[tuple[int, int]] = None  # (original time, rebased ms) of the last event
    for event, due_us in planned:
        time_ms = origin_ms + (due_us + 500) // 1000
        if previous is not None:
            original, last_ms = previous
            time_ms = max(time_ms, last_ms if event.time_us == original else last_ms + 1)
        previous = (event.time_us, time_ms)
        yield Planned(event._replace(time_us=time_ms * 1000), due_us)


def build_message(event: Event) -> Message:
    """The payload is the event's JSON line; `event_time` is the same string as in it."""
    return Message(event_to_json(event).encode("utf-8"), {
        "event_time": time_us_to_rfc3339(event.time_us),
        "event_id": event.event_id,
        "role": event.role,
        "message_key": f"{event.event_id}/{event.role}",
    })
