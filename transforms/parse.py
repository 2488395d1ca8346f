"""Raw records -> validated events, and the dead letters of those that are not.

`RecordParser` and `EventValidator` are pure and raise `InvalidRecord` with a
reason; `ParseEvents` is the thin Beam wrapper that counts and routes.
"""

from __future__ import annotations

import collections

import csv
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from transforms import counters
from transforms.adapters import CsvAdapter
from transforms.event_time import TimeBounds, check_event_time
from transforms.events import DeadLetter, Event, InvalidRecord, RawRecord, event_from_json
from transforms.gather import Batch
from transforms.spec import REQUEST, FeatureSpec, FieldSpec

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

    An event's role is `request` or the name of one of the spec's kinds of
    observation; each has its own fields and (optionally) event id pattern.
    Fields the spec does not name are dropped; a request may carry the label
    (history) or not (live)."""

    def __init__(self, spec: FeatureSpec):
        self._roles = spec.roles
        self._fields, self._patterns = {}, {}
        for role in spec.roles:
            fields = spec.fields(role) + ((spec.label,) if role == REQUEST else ())
            self._fields[role] = [(f.name, f.required, _fast_check(f)) for f in fields]
            pattern = spec.event_id_pattern if role == REQUEST else spec.kind(role).event_id_pattern or \
                spec.event_id_pattern
            self._patterns[role] = re.compile(pattern) if pattern else None

    def __call__(self, event: Event) -> Event:
        fields = self._fields.get(event.role)
        if fields is None:
            raise InvalidRecord(f"role: expected one of {list(self._roles)}, got {event.role!r}")
        pattern = self._patterns[event.role]
        if not event.event_id or (pattern and not pattern.match(event.event_id)):
            raise InvalidRecord(f"event_id: {event.event_id!r} does not match "
                                f"{pattern.pattern if pattern else 'a non-empty id'!r}")
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
    """A raw CSV row (through its source's adapter) or NDJSON line -> valid events.

    adapters: the spec's sources' CSV adapters by source name, resolved by the
    entry point (`beam_app.adapters.load_adapters`): a CSV record names its
    source, or is read by the spec's first one."""

    def __init__(self, spec: FeatureSpec, adapters: Optional[Mapping[str, CsvAdapter]] = None):
        self._validate = EventValidator(spec)
        self._adapters = dict(adapters or {})
        self._primary = spec.sources[0].name if spec.sources else None

    def __call__(self, record: RawRecord) -> list[Event]:
        if "\ufffd" in record.text:
            raise InvalidRecord("not valid UTF-8 (undecodable bytes)")
        if record.kind == "json":
            events = [event_from_json(record.text)]
        elif record.kind == "csv":
            source = record.source_name or self._primary
            adapter = self._adapters.get(source)
            if adapter is None:
                raise InvalidRecord(f"no CSV adapter for source {source!r} (the spec's sources: "
                                    f"{sorted(self._adapters)}): give NDJSON events")
            if not record.header:
                raise InvalidRecord("csv record without a header")
            try:
                values = next(csv.reader([record.text]))
            except (csv.Error, StopIteration) as err:
                raise InvalidRecord(f"unreadable CSV: {err}") from None
            if len(values) != len(record.header):
                raise InvalidRecord(f"expected {len(record.header)} CSV columns, got {len(values)}")
            events = adapter(dict(zip(record.header, values)))
        else:
            raise InvalidRecord(f"unknown record kind {record.kind!r}")
        return [self._validate(event) for event in events]


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

    def __init__(self, spec: FeatureSpec, live: Optional[LiveStamp], adapters: Mapping[str, CsvAdapter],
                 to_record: Optional[Callable[[Any], RawRecord]] = None, tally: Optional[str] = None):
        self._spec = spec
        self._live = live
        self._adapters = dict(adapters)
        self._to_record = to_record
        self._records = counters.RECORDS_READ.metric(tally)
        self._ok = counters.RECORDS_OK.metric()
        self._dead = counters.PARSE_DEAD_LETTERS.metric()
        self._by_role = {role: counters.parsed(role).metric() for role in spec.roles}

    def setup(self):
        self._parse = RecordParser(self._spec, self._adapters)

    def process(self, record: RawRecord, timestamp=beam.DoFn.TimestampParam):
        self._records.inc()
        if self._to_record is not None:
            record = self._to_record(record)
        events, dead = parse_or_dead_letter(self._parse, record, timestamp.micros, self._live)
        if dead is not None:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead)
            return
        self._ok.inc()
        for event in events:
            self._by_role[event.role].inc()
            yield event if self._live is None else beam.window.TimestampedValue(event, Timestamp(micros=event.time_us))


@beam.typehints.with_output_types(Batch)
class _ParseListDoFn(_ParseDoFn):
    """list[RawRecord] -> list[Event] (main) | DeadLetter (tagged), counted: one
    element per list (the runner's cost is per element). Bounded input only."""

    def process(self, records: list, timestamp=beam.DoFn.TimestampParam):
        parse, events, dead_letters = self._parse, [], 0
        for record in records:
            parsed, dead = parse_or_dead_letter(parse, record, 0, None)
            if dead is not None:
                dead_letters += 1
                yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead)
            events.extend(parsed)
        self._records.inc(len(records))
        self._ok.inc(len(records) - dead_letters)
        self._dead.inc(dead_letters)
        roles = collections.Counter(event.role for event in events)
        for role, count in roles.items():
            self._by_role[role].inc(count)
        if events:
            yield Batch(events)


class ParseEvents(beam.PTransform):
    """PCollection[RawRecord] -> {"events": PCollection[Event],
    "dead_letters": PCollection[DeadLetter]}.

    Identical in batch and streaming: the parser knows nothing of where the
    records came from. Element timestamps pass through untouched, except:

    live: records stamped with their publish time (Pub/Sub, read without
    `timestamp_attribute`: see transforms/event_time.py for why). Each
    event's time is checked against its attribute and the publish time,
    and the event leaves stamped with it; a record that fails is a dead
    letter, and the job goes on.

    adapters: the CSV adapters of the spec's sources, by source name (NDJSON
    needs none).

    to_record: makes the RawRecord of each input element (a Pub/Sub message)
    in the same step, which on the streaming DirectRunner saves a bundle per
    bundle; it must not raise (a record it cannot make cannot be a dead letter).

    tally: a streaming job's tally (transforms/counters.py) that the records read are counted into.

    batched: PCollection[list[RawRecord]] in, "events" PCollection[list[Event]]
    out (bounded input: one element per list, the runner's cost is per element)."""

    def __init__(self, spec: FeatureSpec, live: Optional[LiveStamp] = None,
                 adapters: Optional[Mapping[str, CsvAdapter]] = None, label: Optional[str] = None,
                 to_record: Optional[Callable[[Any], RawRecord]] = None, tally: Optional[str] = None,
                 batched: bool = False):
        super().__init__(label)
        if batched and (live is not None or to_record is not None):
            raise ValueError("ParseEvents: batched is for bounded records, without live or to_record")
        self._batched = batched
        self._spec = spec
        self._live = live
        self._adapters = dict(adapters or {})
        self._to_record = to_record
        self._tally = tally

    def expand(self, records):
        parse = _ParseListDoFn if self._batched else _ParseDoFn
        outputs = records | "Parse" >> beam.ParDo(parse(self._spec, self._live, self._adapters,
                                                       self._to_record, self._tally)).with_outputs(
            DEAD_LETTERS, main="events")
        return {"events": outputs.events, DEAD_LETTERS: outputs[DEAD_LETTERS]}
