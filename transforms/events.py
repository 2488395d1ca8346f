"""The element types that flow between the transforms, and the one JSON form of
an event (NDJSON history files and Pub/Sub payloads share it).

An event in JSON is flat: three envelope keys and the spec's fields.

    {"event_id": "20130101-UA1545-EWR", "role": "request",
     "event_time": "2013-01-01T09:15:00Z", "carrier": "UA", ...}
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, NamedTuple, Optional

ENVELOPE = ("event_id", "role", "event_time")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class InvalidRecord(ValueError):
    """A record that cannot become a valid event; the message is the reason
    written to the dead letter, so it must say what is wrong and where."""


class Event(NamedTuple):
    """A validated event. `fields` holds the spec's fields typed as the spec
    says (str, int or float; None where missing and allowed), and on
    history requests the label."""

    event_id: str
    role: str  # "request", or the kind of observation ("observation" in a spec with one kind)
    time_us: int  # event time, microseconds since the Unix epoch (UTC)
    fields: dict[str, Any]


class RawRecord(NamedTuple):
    """A record as read, before parsing: `text` is kept verbatim for dead letters."""

    source: str  # where it came from: "path:line" or "pubsub:<message id>"
    text: str
    kind: str  # "csv" or "json"
    header: Optional[tuple[str, ...]] = None  # csv column names
    attributes: Optional[dict[str, str]] = None  # message attributes (Pub/Sub), kept for dead letters
    source_name: Optional[str] = None  # csv: the spec's source whose adapter reads it (None: the first)


class DeadLetter(NamedTuple):
    """A record we could not use, with the reason, never dropped silently."""

    source: str
    raw: str
    reason: str
    stage: str  # the step that rejected it, e.g. "parse"
    attributes: Optional[dict[str, str]] = None  # the message's attributes, when it had some

    def to_json(self) -> str:
        body = self._asdict()
        if body["attributes"] is None:
            del body["attributes"]
        return json.dumps(body, ensure_ascii=False)


def time_us_to_rfc3339(time_us: int) -> str:
    """Microseconds since the epoch -> '2013-01-01T09:15:00Z' (fraction only when needed)."""
    seconds, micros = divmod(time_us, 1_000_000)
    text = (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


def rfc3339_to_time_us(text: str) -> int:
    """An RFC 3339 timestamp (an offset is required) -> microseconds since the epoch."""
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, AttributeError):
        raise InvalidRecord(f"event_time: not an RFC 3339 timestamp: {text!r}") from None
    if value.tzinfo is None:
        raise InvalidRecord(f"event_time: needs a UTC offset (e.g. a trailing Z): {text!r}")
    return datetime_to_time_us(value)


def datetime_to_time_us(value: dt.datetime) -> int:
    """An aware datetime -> microseconds since the epoch, exactly (no float seconds)."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def event_to_json(event: Event) -> str:
    """The flat JSON form; `event_from_json` reads it back to the same event."""
    body = {"event_id": event.event_id, "role": event.role, "event_time": time_us_to_rfc3339(event.time_us)}
    body.update((k, v) for k, v in event.fields.items() if v is not None)
    return json.dumps(body, separators=(",", ":"))


def event_from_json(text: str) -> Event:
    """Flat JSON -> an unvalidated Event (types are checked against the spec later)."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise InvalidRecord(f"not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(body).__name__}")
    missing = [key for key in ENVELOPE if body.get(key) in (None, "")]
    if missing:
        raise InvalidRecord(f"missing {', '.join(missing)}")
    if not isinstance(body["event_id"], str):
        raise InvalidRecord("event_id: must be a string")
    if not isinstance(body["event_time"], str):
        raise InvalidRecord("event_time: must be an RFC 3339 string")
    fields = {k: v for k, v in body.items() if k not in ENVELOPE}
    return Event(body["event_id"], body["role"], rfc3339_to_time_us(body["event_time"]), fields)
