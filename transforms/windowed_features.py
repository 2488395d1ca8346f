"""`WindowedFeatures(spec)`: the one PTransform that computes every windowed
aggregate of the spec for every request event, in batch and in streaming.

The features are grouped by key field (flights: origin, carrier). For each
group in turn, events are gathered per key value and applied in time order
to a `KeyHistory` (transforms/point_in_time.py), which answers each request
from [t - W, t). The group's answers are written into the request's feature
tuple and every event goes on to the next group's stage; after the last one
the requests leave as `FeatureRow`s.

    events -> stage(origin) -> stage(carrier) -> FeatureRows

How a stage gathers a key's events depends on the input:

- bounded (batch): GroupByKey on (key value, time bucket). Each observation
  is also copied into the later buckets whose requests can still see it, so
  a group holds one bucket plus the longest window, however long the
  history: memory stays bounded and the buckets run in parallel.
- unbounded (streaming): a stateful DoFn per key value buffers events and,
  when the watermark passes the earliest one it holds (an event-time timer),
  applies everything up to that time. The emitted events carry their own
  time, which is the timer's watermark hold, so the next stage never sees
  them as late. Observations arriving behind the watermark are counted as
  late and still join the history.

Both call the same `KeyHistory.apply`, whose result depends only on event
times; the TestStream parity test checks that they agree bit for bit.

Why chained stages and not a fan-out and a join by event_id: keyed state
costs the Python SDK about a millisecond per key (its state cache sizes
every value it loads), fine for a few thousand entity keys, ruinous for one
key per request.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms.events import Event
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, history_fields
from transforms.spec import FeatureSpec, WindowedFeature

_US = 1_000_000
MIN_BUCKET_S = 86_400  # batch buckets: at least a day, so copies of observations stay a small share

# Between stages an element is a plain tuple, cheap to encode:
#     (event_id, rank, time_us, values, features)
# rank is REQUEST or OBSERVATION, values the event's fields in the order of
# `EventLayout` for its role, features the spec-ordered tuple being filled.
ID, RANK, TIME, VALUES, FEATURES = range(5)


class FeatureRow(NamedTuple):
    """A request event with its windowed features, in spec order (None = empty window)."""

    event: Event
    features: tuple[Optional[float], ...]


class EventLayout(NamedTuple):
    """The order of an element's values, per rank."""

    names: tuple[tuple[str, ...], tuple[str, ...]]  # [REQUEST], [OBSERVATION]

    @classmethod
    def of(cls, spec: FeatureSpec) -> "EventLayout":
        return cls((tuple(f.name for f in spec.request_fields) + (spec.label.name,),
                    tuple(f.name for f in spec.observation_fields)))

    def to_item(self, event: Event, features: tuple) -> tuple:
        rank = REQUEST if event.role == "request" else OBSERVATION
        values = tuple(event.fields.get(name) for name in self.names[rank])
        return event.event_id, rank, event.time_us, values, features

    def to_row(self, item: tuple) -> FeatureRow:
        rank = item[RANK]
        event = Event(item[ID], "request" if rank == REQUEST else "observation", item[TIME],
                      dict(zip(self.names[rank], item[VALUES])))
        return FeatureRow(event, item[FEATURES])

    def index(self, rank: int, name: str) -> int:
        return self.names[rank].index(name)


class FeatureGroup(NamedTuple):
    """The windowed features sharing one key field: one stage of the chain."""

    key_field: str
    features: tuple[WindowedFeature, ...]
    slots: tuple[int, ...]  # where each feature's value goes in the spec-ordered tuple
    key_index: tuple[int, int]  # where the key value is in an item's values, per rank
    value_index: tuple[int, ...]  # where `history_fields(features)` are in an observation's values
    last: bool  # the last stage drops observations: nothing reads them after it


def feature_groups(spec: FeatureSpec) -> tuple[FeatureGroup, ...]:
    """The windowed features grouped by key field, in spec order."""
    layout = EventLayout.of(spec)
    by_key: dict[str, list[WindowedFeature]] = {}
    for feature in spec.windowed_features:
        by_key.setdefault(feature.key, []).append(feature)
    return tuple(
        FeatureGroup(
            key_field=key,
            features=tuple(features),
            slots=tuple(spec.windowed_features.index(f) for f in features),
            key_index=(layout.index(REQUEST, key), layout.index(OBSERVATION, key)),
            value_index=tuple(layout.index(OBSERVATION, f) for f in history_fields(features)),
            last=index == len(by_key) - 1)
        for index, (key, features) in enumerate(by_key.items()))


def key_of(item: tuple, group: FeatureGroup) -> str:
    return item[VALUES][group.key_index[item[RANK]]]


def to_pending(item: tuple, group: FeatureGroup) -> PendingEvent:
    """An element -> what the engine needs, carrying the element along."""
    if item[RANK] == REQUEST:
        return PendingEvent(item[TIME], REQUEST, item[ID], (), item)
    values = item[VALUES]
    return PendingEvent(item[TIME], OBSERVATION, item[ID], tuple(values[i] for i in group.value_index), item)


def fill(item: tuple, slots: tuple[int, ...], answer: tuple) -> tuple:
    """The element with one group's answers written into their slots."""
    filled = list(item[FEATURES])
    for slot, value in zip(slots, answer):
        filled[slot] = value
    return item[:FEATURES] + (tuple(filled),)


def _stamped(item: tuple):
    return beam.window.TimestampedValue(item, Timestamp(micros=item[TIME]))


def bucket_span_us(group: FeatureGroup) -> int:
    return max(MIN_BUCKET_S, max(f.window_s for f in group.features)) * _US


def buckets_of(time_us: int, rank: int, horizon_us: int, span_us: int) -> range:
    """The time buckets an event belongs to: a request its own; an observation
    its own and every later one holding a request that can see it (t <= o + W)."""
    own = time_us // span_us
    if rank == REQUEST:
        return range(own, own + 1)
    return range(own, (time_us + horizon_us) // span_us + 1)


def answer_bucket(group: FeatureGroup, bucket: int, span_us: int, items: Iterable[tuple]) -> list[tuple]:
    """All events of one (key value, bucket) -> the elements to pass on: the
    bucket's requests with the group's features filled in and, unless this is
    the last stage, the bucket's own observations (not the copies)."""
    answers, _, _ = KeyHistory(group.features).apply(to_pending(item, group) for item in items)
    out = [fill(pending.payload, group.slots, answer) for pending, answer in answers]
    if not group.last:
        out.extend(item for item in items if item[RANK] == OBSERVATION and item[TIME] // span_us == bucket)
    return out


class _BucketedStage(beam.PTransform):
    """Bounded input: PCollection[(event, features)] -> the same, this group filled in."""

    def __init__(self, group: FeatureGroup):
        super().__init__()
        self._group = group

    def expand(self, items):
        group = self._group
        span_us = bucket_span_us(group)
        horizon_us = max(f.window_s for f in group.features) * _US

        def to_buckets(item):
            key = key_of(item, group)
            return [((key, bucket), item) for bucket in buckets_of(item[TIME], item[RANK], horizon_us, span_us)]

        def answer(keyed):
            (_, bucket), bucket_items = keyed
            return answer_bucket(group, bucket, span_us, list(bucket_items))

        return (
            items
            | "ToBuckets" >> beam.FlatMap(to_buckets).with_output_types(tuple[tuple[str, int], tuple])
            | "GroupBuckets" >> beam.GroupByKey()
            | "Answer" >> beam.FlatMap(answer)
        )


class _PointInTimeDoFn(beam.DoFn):
    """Unbounded input: (key value, (event, features)) -> (event, features) with
    this group filled in on requests, released in time order once the watermark
    has passed them."""

    BUFFER = BagStateSpec("buffer", FastPrimitivesCoder())
    HISTORY = ReadModifyWriteStateSpec("history", FastPrimitivesCoder())
    TIMER_AT = ReadModifyWriteStateSpec("timer_at", VarIntCoder())
    RELEASE = TimerSpec("release", TimeDomain.WATERMARK)

    def __init__(self, group: FeatureGroup):
        self._group = group
        self._late_requests = Metrics.counter("windowed_features", "late_requests")
        self._late_observations = Metrics.counter("windowed_features", "late_observations")

    def process(self, element, buffer=beam.DoFn.StateParam(BUFFER),
                timer_at=beam.DoFn.StateParam(TIMER_AT), release=beam.DoFn.TimerParam(RELEASE)):
        _, item = element
        buffer.add(item)
        time_us = item[TIME]
        pending = timer_at.read()
        if pending is None or time_us < pending:  # the timer (and hold) stays at the earliest buffered event
            release.set(Timestamp(micros=time_us))
            timer_at.write(time_us)

    @on_timer(RELEASE)
    def on_release(self, fired_at=beam.DoFn.TimestampParam, buffer=beam.DoFn.StateParam(BUFFER),
                   history=beam.DoFn.StateParam(HISTORY), timer_at=beam.DoFn.StateParam(TIMER_AT),
                   release=beam.DoFn.TimerParam(RELEASE)):
        ready, rest = [], []
        for item in buffer.read():
            (ready if item[TIME] <= fired_at.micros else rest).append(item)
        state = KeyHistory.from_state(self._group.features, history.read())
        answers, late_requests, late_observations = state.apply(to_pending(item, self._group) for item in ready)
        history.write(state.to_state())
        buffer.clear()
        timer_at.clear()
        if rest:
            for item in rest:
                buffer.add(item)
            next_us = min(item[TIME] for item in rest)
            release.set(Timestamp(micros=next_us))
            timer_at.write(next_us)
        self._late_requests.inc(late_requests)
        self._late_observations.inc(late_observations)
        for pending, answer in answers:
            yield _stamped(fill(pending.payload, self._group.slots, answer))
        if not self._group.last:
            for item in ready:
                if item[RANK] == OBSERVATION:
                    yield _stamped(item)


class _StatefulStage(beam.PTransform):
    """Unbounded input: PCollection[(event, features)] -> the same, this group filled in."""

    def __init__(self, group: FeatureGroup, first: bool):
        super().__init__()
        self._group = group
        self._first = first

    def expand(self, items):
        if not self._first:
            # Beam's FnApiRunner fuses consecutive stateful DoFns into one stage
            # and then mixes up their timers, which loses every element (seen on
            # Beam 2.77). A shuffle keeps them apart; other runners shuffle here anyway.
            items = items | "Separate" >> beam.Reshuffle()
        group = self._group
        return (
            items
            | "KeyBy" >> beam.Map(lambda item: (key_of(item, group), item)).with_output_types(tuple[str, tuple])
            | "PointInTime" >> beam.ParDo(_PointInTimeDoFn(self._group))
        )


class _ToRow(beam.DoFn):
    """Element -> FeatureRow at the request's event time (batch stages drop timestamps)."""

    def __init__(self, layout: EventLayout):
        self._layout = layout
        self._rows = Metrics.counter("windowed_features", "feature_rows")

    def process(self, item):
        self._rows.inc()
        yield beam.window.TimestampedValue(self._layout.to_row(item), Timestamp(micros=item[TIME]))


class WindowedFeatures(beam.PTransform):
    """PCollection[Event] (requests and observations, in any order) ->
    PCollection[FeatureRow], one per request, timestamped at the request time."""

    def __init__(self, spec: FeatureSpec, label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec

    def expand(self, events):
        empty = (None,) * len(self._spec.windowed_features)
        layout = EventLayout.of(self._spec)
        items = events | "Start" >> beam.Map(lambda event: layout.to_item(event, empty))
        for index, group in enumerate(feature_groups(self._spec)):
            stage = _BucketedStage(group) if events.is_bounded else _StatefulStage(group, first=index == 0)
            items = items | f"Features_{group.key_field}" >> stage
        return items | "ToRows" >> beam.ParDo(_ToRow(layout)).with_output_types(FeatureRow)
