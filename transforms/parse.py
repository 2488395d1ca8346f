"""Raw records -> validated events, and the dead letters of those that are not.

`parse_record` and `validate_event` are pure and raise `InvalidRecord` with a
reason; `ParseEvents` is the thin Beam wrapper that counts and routes.
"""

from __future__ import annotations

import csv
import math
import re
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp

from transforms.adapters import load_adapter

from transforms.event_time import TimeBounds, check_event_time
from transforms.events import DeadLetter, Event, InvalidRecord, RawRecord, event_from_json
from transforms.spec import ROLES, FeatureSpec, FieldSpec

DEAD_LETTERS = "dead_letters"


def _typed(field: FieldSpec, value: Any) -> Any:
    """A value coerced to the field's type, or InvalidRecord saying why not."""
    if field.type == "string":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRecord(f"{field.name}: expected a non-empty string, got {value!r}")
        value = value.strip()
        if field.vocabulary is not None and value not in field.vocabulary:
            raise InvalidRecord(f"{field.name}: unknown value {value!r}; allowed: {list(field.vocabulary)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRecord(f"{field.name}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRecord(f"{field.name}: expected a finite number, got {value!r}")
    if field.type == "int":
        if value != int(value):
            raise InvalidRecord(f"{field.name}: expected an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if field.min is not None and value < field.min:
        raise InvalidRecord(f"{field.name}: {value} is below the minimum {field.min:g}")
    if field.max is not None and value > field.max:
        raise InvalidRecord(f"{field.name}: {value} is above the maximum {field.max:g}")
    return value


def _fast_check(field: FieldSpec):
    """A check for values that are already of the right type and in range;
    anything else goes through `_typed`, which coerces or says what is wrong."""
    lo = field.min if field.min is not None else -math.inf
    hi = field.max if field.max is not None else math.inf
    vocabulary = frozenset(field.vocabulary) if field.vocabulary is not None else None
    if field.type == "string":
        def check(value):
            if type(value) is str and value and value[0] != " " and value[-1] != " " and (
                    vocabulary is None or value in vocabulary):
                return value
            return _typed(field, value)
    else:
        exact = float if field.type == "float" else int

        def check(value):
            if type(value) is exact and lo <= value <= hi:
                return value
            return _typed(field, value)
    return check


class EventValidator:
    """Checks and types events against the spec (compiled once: it runs per event).

    Fields the spec does not name are dropped; a request may carry the label
    (history) or not (live)."""

    def __init__(self, spec: FeatureSpec):
        self._pattern = re.compile(spec.event_id_pattern) if spec.event_id_pattern else None
        self._fields = {}
        for role in ROLES:
            fields = spec.fields(role) + ((spec.label,) if role == "request" else ())
            self._fields[role] = [(f.name, f.required, _fast_check(f)) for f in fields]

    def __call__(self, event: Event) -> Event:
        fields = self._fields.get(event.role)
        if fields is None:
            raise InvalidRecord(f"role: expected one of {list(ROLES)}, got {event.role!r}")
        if not event.event_id or (self._pattern and not self._pattern.match(event.event_id)):
            raise InvalidRecord(f"event_id: {event.event_id!r} does not match "
                                f"{self._pattern.pattern if self._pattern else 'a non-empty id'!r}")
        raw = event.fields
        typed: dict[str, Any] = {}
        for name, required, check in fields:
            value = raw.get(name)
            if value is None or value == "":
                if required:
                    raise InvalidRecord(f"{name}: missing (required on {event.role} events)")
                typed[name] = None
            else:
                typed[name] = check(value)
        return Event(event.event_id, event.role, event.time_us, typed)


class RecordParser:
    """A raw CSV row (through the spec's adapter) or NDJSON line -> valid events."""

    def __init__(self, spec: FeatureSpec):
        self._validate = EventValidator(spec)
        self._adapter = load_adapter(spec.csv_adapter) if spec.csv_adapter else None

    def __call__(self, record: RawRecord) -> list[Event]:
        if "\ufffd" in record.text:
            raise InvalidRecord("not valid UTF-8 (undecodable bytes)")
        if record.kind == "json":
            events = [event_from_json(record.text)]
        elif record.kind == "csv":
            if self._adapter is None:
                raise InvalidRecord("this spec names no CSV adapter: give NDJSON events")
            if not record.header:
                raise InvalidRecord("csv record without a header")
            try:
                values = next(csv.reader([record.text]))
            except (csv.Error, StopIteration) as err:
                raise InvalidRecord(f"unreadable CSV: {err}") from None
            if len(values) != len(record.header):
                raise InvalidRecord(f"expected {len(record.header)} CSV columns, got {len(values)}")
            events = self._adapter(dict(zip(record.header, values)))
        else:
            raise InvalidRecord(f"unknown record kind {record.kind!r}")
        return [self._validate(event) for event in events]


def validate_event(spec: FeatureSpec, event: Event) -> Event:
    """One event checked against the spec (tests and one-offs; jobs keep an EventValidator)."""
    return EventValidator(spec)(event)


def parse_record(spec: FeatureSpec, record: RawRecord) -> list[Event]:
    """One record parsed against the spec (tests and one-offs; jobs keep a RecordParser)."""
    return RecordParser(spec)(record)


class LiveStamp(NamedTuple):
    """How live records carry their event time: the attribute that holds it,
    and how far from the publish time (the element's timestamp) it may be."""

    attribute: str
    bounds: TimeBounds


def parse_or_dead_letter(parse: RecordParser, record: RawRecord, publish_time_us: int,
                         live: Optional[LiveStamp]) -> tuple[list[Event], Optional[DeadLetter]]:
    """One record -> (its events, None) or ([], its dead letter): never raises.
    live: the record came from a live source at `publish_time_us`; its events'
    times are checked against their attribute and that time."""
    try:
        events = parse(record)
        if live is not None:
            for event in events:
                check_event_time(event, record.attributes, live.attribute, publish_time_us, live.bounds)
    except (InvalidRecord, ValueError) as err:
        return [], DeadLetter(record.source, record.text, str(err), "parse", record.attributes)
    return events, None


class _ParseDoFn(beam.DoFn):
    """RawRecord -> Event (main) | DeadLetter (tagged), counted. With a
    LiveStamp, each event leaves stamped with its checked event time."""

    def __init__(self, spec: FeatureSpec, live: Optional[LiveStamp]):
        self._spec = spec
        self._live = live
        self._records = Metrics.counter("parse", "records_read")
        self._ok = Metrics.counter("parse", "records_ok")
        self._dead = Metrics.counter("parse", "dead_letters")
        self._by_role = {role: Metrics.counter("parse", f"{role}s") for role in ROLES}

    def setup(self):
        self._parse = RecordParser(self._spec)

    def process(self, record: RawRecord, timestamp=beam.DoFn.TimestampParam):
        self._records.inc()
        events, dead = parse_or_dead_letter(self._parse, record, timestamp.micros, self._live)
        if dead is not None:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead)
            return
        self._ok.inc()
        for event in events:
            self._by_role[event.role].inc()
            yield event if self._live is None else beam.window.TimestampedValue(event, Timestamp(micros=event.time_us))


class ParseEvents(beam.PTransform):
    """PCollection[RawRecord] -> {"events": PCollection[Event],
    "dead_letters": PCollection[DeadLetter]}.

    Identical in batch and streaming: the parser knows nothing of where the
    records came from. Element timestamps pass through untouched, except:

    live: records stamped with their publish time (Pub/Sub, read without
    `timestamp_attribute`: see transforms/event_time.py for why). Each
    event's time is checked against its attribute and the publish time,
    and the event leaves stamped with it; a record that fails is a dead
    letter, and the job goes on."""

    def __init__(self, spec: FeatureSpec, live: Optional[LiveStamp] = None, label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._live = live

    def expand(self, records):
        outputs = records | "Parse" >> beam.ParDo(_ParseDoFn(self._spec, self._live)).with_outputs(
            DEAD_LETTERS, main="events")
        return {"events": outputs.events, DEAD_LETTERS: outputs[DEAD_LETTERS]}
