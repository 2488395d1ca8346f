"""Event time of a live message, checked before anything trusts it.

Why the job does not let the source stamp messages (`ReadFromPubSub(timestamp_attribute=...)`):
the source parses the attribute itself, and one unparseable value raises before the ack, so the
bundle is retried and the job stalls on that message for good (measured on the DirectRunner;
Dataflow's native source also needs a valid attribute). Instead the job reads messages stamped
with their **publish time**, and this module decides, per message, whether its event time can be
used:

- the `event_time` attribute must be present, parse (RFC 3339 with an offset, or milliseconds
  since the epoch, as Beam's `timestamp_attribute` accepts) and equal the payload's event_time to
  the millisecond (Pub/Sub keeps ms);
- an event may not be further than `max_future_s` ahead of its publish time (a clock that is
  wrong, or a year-9999 typo, would otherwise be held until the watermark reaches it: forever);
- a request may not be older than its publish time minus `allowed_lateness_s`: its history is
  no longer kept, so its features could not be exact.

Anything else becomes a dead letter with the reason (`InvalidRecord`), and the event is then
re-stamped with its event time. The watermark follows publish times, on the DirectRunner (the
wall clock) as on Dataflow, which never runs ahead of an honest producer's event times; an event
published late is late by its publish delay, as the contract expects.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

from transforms.events import Event, InvalidRecord, rfc3339_to_time_us, time_us_to_rfc3339

_US = 1_000_000
TIMER_RESOLUTION_US = 1000


def timer_us(time_us: int) -> int:
    """The time to set an event-time timer at for `time_us`: the next whole
    millisecond. Runners keep timer times in milliseconds (the portable timer
    coder, Dataflow), so a timer set between two fires at the earlier one,
    before the time it stands for: a DoFn that then finds nothing due and
    sets it again would fire it forever. Event times may carry microseconds."""
    return -(-time_us // TIMER_RESOLUTION_US) * TIMER_RESOLUTION_US
# Beam's timestamps end near the year 294247; an epoch-ms attribute beyond that is not a time.
_MAX_ATTRIBUTE_MS = 10 ** 16


class TimeBounds(NamedTuple):
    """How far an event's time may be from its publish time."""

    max_future_s: int  # ahead of the publish time, any event
    allowed_lateness_s: int  # behind it, a request (observations only feed history and may be older)


def attribute_time_us(attributes: Optional[Mapping[str, str]], name: str) -> int:
    """The event time an attribute carries, in microseconds; InvalidRecord if missing or not a time."""
    value = (attributes or {}).get(name)
    if value is None or value == "":
        raise InvalidRecord(f"event_time: the message has no {name!r} attribute: publish each event with "
                            f"{name}=<its event time, RFC 3339>")
    text = value.strip()
    if text.isdigit() and text.isascii():
        millis = int(text)
        if millis >= _MAX_ATTRIBUTE_MS:
            raise InvalidRecord(f"event_time: attribute {name}={value!r} is not a time (ms since the epoch)")
        return millis * 1000
    try:
        return rfc3339_to_time_us(text)
    except (InvalidRecord, OverflowError):
        raise InvalidRecord(f"event_time: attribute {name}={value!r} is neither RFC 3339 nor ms since the "
                            "epoch") from None


def check_event_time(event: Event, attributes: Optional[Mapping[str, str]], attribute: str,
                     publish_time_us: int, bounds: TimeBounds) -> None:
    """Raises InvalidRecord when `event` (parsed from a message published at
    `publish_time_us` with `attributes`) cannot be used at its event time."""
    stamped_us = attribute_time_us(attributes, attribute)
    if event.time_us // 1000 != stamped_us // 1000:
        raise InvalidRecord(
            f"event_time: the payload says {time_us_to_rfc3339(event.time_us)} but the {attribute} attribute says "
            f"{attributes[attribute]!r}: publish with the attribute equal to the payload's event_time")
    check_time_bounds(event, publish_time_us, bounds, "published")


def check_time_bounds(event: Event, received_us: int, bounds: TimeBounds, verb: str = "received") -> None:
    """Raises InvalidRecord when `event`, received (published) at `received_us`, is further
    ahead than max_future_s, or is a request older than allowed_lateness_s: the one rule of
    the stream and of the online service."""
    ahead_us = event.time_us - received_us
    if ahead_us > bounds.max_future_s * _US:
        raise InvalidRecord(
            f"event_time: {time_us_to_rfc3339(event.time_us)} is {ahead_us / _US:,.0f} s after it was {verb} "
            f"({time_us_to_rfc3339(received_us)}), more than --max_future_s {bounds.max_future_s}: "
            "a wrong clock or a wrong time")
    behind_us = received_us - event.time_us
    if event.role == "request" and behind_us > bounds.allowed_lateness_s * _US:
        raise InvalidRecord(
            f"event_time: request at {time_us_to_rfc3339(event.time_us)} {verb} {behind_us / _US:,.0f} s later "
            f"({time_us_to_rfc3339(received_us)}), more than --allowed_lateness_s {bounds.allowed_lateness_s}: "
            "the history its features need is no longer kept")
