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

# Between stages an element is (event, features): the Event as a plain tuple
# (cheaper to encode than the NamedTuple) and the spec-ordered feature tuple,
# filled in group by group.


class FeatureRow(NamedTuple):
    """A request event with its windowed features, in spec order (None = empty window)."""

    event: Event
    features: tuple[Optional[float], ...]


class FeatureGroup(NamedTuple):
    """The windowed features sharing one key field: one stage of the chain."""

    key_field: str
    features: tuple[WindowedFeature, ...]
    slots: tuple[int, ...]  # where each feature's value goes in the spec-ordered tuple
    last: bool  # the last stage drops observations: nothing reads them after it


def feature_groups(spec: FeatureSpec) -> tuple[FeatureGroup, ...]:
    """The windowed features grouped by key field, in spec order."""
    by_key: dict[str, list[WindowedFeature]] = {}
    for feature in spec.windowed_features:
        by_key.setdefault(feature.key, []).append(feature)
    return tuple(
        FeatureGroup(key, tuple(features), tuple(spec.windowed_features.index(f) for f in features),
                     index == len(by_key) - 1)
        for index, (key, features) in enumerate(by_key.items()))


def to_pending(item: tuple, fields: tuple[str, ...]) -> PendingEvent:
    """An (event, features) element -> what the engine needs, carrying the element along."""
    event_id, role, time_us, values = item[0]
    if role == "request":
        return PendingEvent(time_us, REQUEST, event_id, (), item)
    return PendingEvent(time_us, OBSERVATION, event_id, tuple(values.get(f) for f in fields), item)


def fill(item: tuple, slots: tuple[int, ...], answer: tuple) -> tuple:
    """The (event, features) element with one group's answers written into their slots."""
    event, features = item
    filled = list(features)
    for slot, value in zip(slots, answer):
        filled[slot] = value
    return event, tuple(filled)


def _stamped(item: tuple):
    return beam.window.TimestampedValue(item, Timestamp(micros=item[0][2]))


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
    fields = history_fields(group.features)
    answers, _, _ = KeyHistory(group.features).apply(to_pending(item, fields) for item in items)
    out = [fill(pending.payload, group.slots, answer) for pending, answer in answers]
    if not group.last:
        out.extend(item for item in items
                   if item[0][1] == "observation" and item[0][2] // span_us == bucket)
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
            event = item[0]
            rank = REQUEST if event[1] == "request" else OBSERVATION
            key = event[3][group.key_field]
            return [((key, bucket), item) for bucket in buckets_of(event[2], rank, horizon_us, span_us)]

        def answer(keyed):
            (_, bucket), bucket_items = keyed
            return [_stamped(item) for item in answer_bucket(group, bucket, span_us, list(bucket_items))]

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
        self._fields = history_fields(group.features)
        self._late_requests = Metrics.counter("windowed_features", "late_requests")
        self._late_observations = Metrics.counter("windowed_features", "late_observations")

    def process(self, element, buffer=beam.DoFn.StateParam(BUFFER),
                timer_at=beam.DoFn.StateParam(TIMER_AT), release=beam.DoFn.TimerParam(RELEASE)):
        _, item = element
        buffer.add(item)
        time_us = item[0][2]
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
            (ready if item[0][2] <= fired_at.micros else rest).append(item)
        state = KeyHistory.from_state(self._group.features, history.read())
        answers, late_requests, late_observations = state.apply(to_pending(item, self._fields) for item in ready)
        history.write(state.to_state())
        buffer.clear()
        timer_at.clear()
        if rest:
            for item in rest:
                buffer.add(item)
            next_us = min(item[0][2] for item in rest)
            release.set(Timestamp(micros=next_us))
            timer_at.write(next_us)
        self._late_requests.inc(late_requests)
        self._late_observations.inc(late_observations)
        for pending, answer in answers:
            yield _stamped(fill(pending.payload, self._group.slots, answer))
        if not self._group.last:
            for item in ready:
                if item[0][1] == "observation":
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
        key_field = self._group.key_field
        return (
            items
            | "KeyBy" >> beam.Map(lambda item: (item[0][3][key_field], item)).with_output_types(tuple[str, tuple])
            | "PointInTime" >> beam.ParDo(_PointInTimeDoFn(self._group))
        )


class _ToRow(beam.DoFn):
    def __init__(self):
        self._rows = Metrics.counter("windowed_features", "feature_rows")

    def process(self, item):
        event, features = item
        self._rows.inc()
        yield FeatureRow(Event(*event), features)


class WindowedFeatures(beam.PTransform):
    """PCollection[Event] (requests and observations, in any order) ->
    PCollection[FeatureRow], one per request, timestamped at the request time."""

    def __init__(self, spec: FeatureSpec, label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec

    def expand(self, events):
        empty = (None,) * len(self._spec.windowed_features)
        items = events | "Start" >> beam.Map(lambda event: (tuple(event), empty))
        for index, group in enumerate(feature_groups(self._spec)):
            stage = _BucketedStage(group) if events.is_bounded else _StatefulStage(group, first=index == 0)
            items = items | f"Features_{group.key_field}" >> stage
        return items | "ToRows" >> beam.ParDo(_ToRow()).with_output_types(FeatureRow)
