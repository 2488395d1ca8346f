"""Raw records -> validated events, and the dead letters of those that are not.

`parse_record` and `validate_event` are pure and raise `InvalidRecord` with a
reason; `ParseEvents` is the thin Beam wrapper that counts and routes.
"""

from __future__ import annotations

import csv
import math
import re
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.adapters import load_adapter
from transforms.events import DeadLetter, Event, InvalidRecord, RawRecord, event_from_json, time_us_to_rfc3339
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


def check_event_time(event: Event, element_time_us: int) -> None:
    """A source that stamps elements itself (Pub/Sub's event_time attribute)
    must agree with the payload's event_time, to the millisecond (Dataflow
    keeps Pub/Sub timestamps at ms precision): features are computed from the
    payload, windows and watermarks from the stamp."""
    if event.time_us // 1000 != element_time_us // 1000:
        raise InvalidRecord(
            f"event_time: the payload says {time_us_to_rfc3339(event.time_us)} but the message is stamped "
            f"{time_us_to_rfc3339(element_time_us)} (its event_time attribute, or its publish time when the "
            "attribute is missing): publish with the event_time attribute equal to the payload's")


def validate_event(spec: FeatureSpec, event: Event) -> Event:
    """One event checked against the spec (tests and one-offs; jobs keep an EventValidator)."""
    return EventValidator(spec)(event)


def parse_record(spec: FeatureSpec, record: RawRecord) -> list[Event]:
    """One record parsed against the spec (tests and one-offs; jobs keep a RecordParser)."""
    return RecordParser(spec)(record)


class _ParseDoFn(beam.DoFn):
    """RawRecord -> Event (main) | DeadLetter (tagged), counted."""

    def __init__(self, spec: FeatureSpec, check_timestamps: bool):
        self._spec = spec
        self._check_timestamps = check_timestamps
        self._records = Metrics.counter("parse", "records_read")
        self._ok = Metrics.counter("parse", "records_ok")
        self._dead = Metrics.counter("parse", "dead_letters")
        self._by_role = {role: Metrics.counter("parse", f"{role}s") for role in ROLES}

    def setup(self):
        self._parse = RecordParser(self._spec)

    def process(self, record: RawRecord, timestamp=beam.DoFn.TimestampParam):
        self._records.inc()
        try:
            events = self._parse(record)
            if self._check_timestamps:
                for event in events:
                    check_event_time(event, timestamp.micros)
        except (InvalidRecord, ValueError) as err:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                record.source, record.text, str(err), "parse", record.attributes))
            return
        self._ok.inc()
        for event in events:
            self._by_role[event.role].inc()
            yield event


class ParseEvents(beam.PTransform):
    """PCollection[RawRecord] -> {"events": PCollection[Event],
    "dead_letters": PCollection[DeadLetter]}.

    Identical in batch and streaming: the parser knows nothing of where the
    records came from. Element timestamps pass through untouched.

    check_timestamps: the source stamped each record with its event time
    (Pub/Sub); a payload whose event_time disagrees is a dead letter."""

    def __init__(self, spec: FeatureSpec, check_timestamps: bool = False, label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._check_timestamps = check_timestamps

    def expand(self, records):
        outputs = records | "Parse" >> beam.ParDo(_ParseDoFn(self._spec, self._check_timestamps)).with_outputs(
            DEAD_LETTERS, main="events")
        return {"events": outputs.events, DEAD_LETTERS: outputs[DEAD_LETTERS]}
