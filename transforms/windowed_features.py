"""`WindowedFeatures(spec)`: the one PTransform that computes every windowed
aggregate of the spec for every request event, in batch and in streaming.

The features are grouped by key field (flights: origin, carrier). For each
group, the events of each key value are gathered and applied in time order
to a `KeyHistory` (transforms/point_in_time.py), which answers each request
from [t - W, t). How the events are gathered depends on the input:

- bounded (batch): the groups run as a chain of GroupByKeys on (key value,
  time bucket); requests go from one group's stage to the next, picking up
  that group's values, and every stage reads the observations from the
  input. Each observation is also copied into the later buckets whose
  requests can still see it, so a group holds one bucket plus the longest
  window, however long the history: memory stays bounded and buckets run in
  parallel. No per-request state: keyed state costs the Python SDK about a
  millisecond per key (its state cache sizes every value it loads).

      observations ----------+--------------------+
                             v                    v
      requests --> stage(origin) --requests--> stage(carrier) --> FeatureRows

- unbounded (streaming): every group's stage reads the input; a stateful
  DoFn per key value (or per shard of key values, `key_shards`) buffers
  events and, when the watermark passes the earliest one it holds (an
  event-time timer), applies everything up to that time and emits each
  request's values for the group. A stateful join per event_id emits the row
  once the request and every group's values are in: no stage waits on
  another's watermark, so the result does not depend on how a runner holds
  watermarks for timers. Observations arriving behind the watermark are
  counted as late and still join the history; a request up to
  `allowed_lateness_s` late is still answered exactly.

Both call the same `KeyHistory.apply`, whose result depends only on event
times; the TestStream parity test checks that they agree bit for bit.
"""

from __future__ import annotations

import zlib
from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms.events import Event
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, history_series, series_value
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
    series_index: tuple[tuple[int, ...], ...]  # where each of `history_series(features)` is in an observation's values
    first: bool  # every stage sees every event, so only the first counts late ones


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
            series_index=tuple(tuple(layout.index(OBSERVATION, f) for f in series)
                               for series in history_series(features)),
            first=index == 0)
        for index, (key, features) in enumerate(by_key.items()))


def key_of(item: tuple, group: FeatureGroup) -> str:
    return item[VALUES][group.key_index[item[RANK]]]


def to_pending(item: tuple, group: FeatureGroup) -> PendingEvent:
    """An element -> what the engine needs, carrying the element along."""
    if item[RANK] == REQUEST:
        return PendingEvent(item[TIME], REQUEST, item[ID], (), item)
    values = item[VALUES]
    return PendingEvent(item[TIME], OBSERVATION, item[ID],
                        tuple(series_value(values, index) for index in group.series_index), item)


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


def answer_bucket(group: FeatureGroup, items: Iterable[tuple]) -> list[tuple]:
    """All events of one (key value, bucket) -> the bucket's requests with the
    group's features filled in."""
    answers, _, _ = KeyHistory(group.features).apply(to_pending(item, group) for item in items)
    return [fill(pending.payload, group.slots, answer) for pending, answer in answers]


class _BucketedStage(beam.PTransform):
    """Bounded input: PCollection[element] (observations and requests) ->
    PCollection[element] of the requests, with this group filled in."""

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
            _, bucket_items = keyed
            return answer_bucket(group, bucket_items)

        return (
            items
            | "ToBuckets" >> beam.FlatMap(to_buckets).with_output_types(tuple[tuple[str, int], tuple])
            | "GroupBuckets" >> beam.GroupByKey()
            | "Answer" >> beam.FlatMap(answer)
        )


def release_time(time_us: int, step_us: int) -> int:
    """When an event may be released: the end of its step of event time. The
    watermark has then passed every event of the step, so one timer firing
    releases them all, where a timer per event time would fire once per
    distinct time (each firing a bundle through every later step)."""
    return -(-time_us // step_us) * step_us if step_us > 1 else time_us


def state_key(key: str, shards: Optional[int]) -> str:
    """The state a key value lives in: its own, or one of `shards` (a stable
    hash: Python's hash() differs between worker processes)."""
    return key if shards is None else f"shard-{zlib.crc32(key.encode()) % shards}"


class _PointInTimeDoFn(beam.DoFn):
    """Unbounded input: (state key, element) -> (event_id, (group index, values))
    for each request, released in time order once the watermark has passed it.
    A state key holds one or more key values, each with its own history."""

    BUFFER = BagStateSpec("buffer", FastPrimitivesCoder())
    HISTORIES = ReadModifyWriteStateSpec("histories", FastPrimitivesCoder())  # {key value: KeyHistory state}
    TIMER_AT = ReadModifyWriteStateSpec("timer_at", VarIntCoder())
    RELEASE = TimerSpec("release", TimeDomain.WATERMARK)
    # At the end of the window (a drained or finished stream) a timer set from
    # then on never fires: this one, set while the window is open, releases
    # whatever is still buffered.
    DRAIN = TimerSpec("drain", TimeDomain.WATERMARK)

    def __init__(self, group: FeatureGroup, index: int, allowed_lateness_s: int, release_step_us: int):
        self._group = group
        self._index = index
        self._lateness_s = allowed_lateness_s
        self._step_us = release_step_us
        self._late_requests = Metrics.counter("windowed_features", "late_requests")
        self._late_observations = Metrics.counter("windowed_features", "late_observations")

    def process(self, element, buffer=beam.DoFn.StateParam(BUFFER), timer_at=beam.DoFn.StateParam(TIMER_AT),
                release=beam.DoFn.TimerParam(RELEASE), drain=beam.DoFn.TimerParam(DRAIN)):
        _, item = element
        buffer.add(item)
        time_us = item[TIME]
        pending = timer_at.read()
        if pending is None:
            drain.set(GlobalWindow().max_timestamp())
        release_at = release_time(time_us, self._step_us)
        if pending is None or release_at < pending:  # the timer stays at the earliest buffered event's step
            release.set(Timestamp(micros=release_at))
            timer_at.write(release_at)

    @on_timer(RELEASE)
    def on_release(self, fired_at=beam.DoFn.TimestampParam, buffer=beam.DoFn.StateParam(BUFFER),
                   histories=beam.DoFn.StateParam(HISTORIES), timer_at=beam.DoFn.StateParam(TIMER_AT),
                   release=beam.DoFn.TimerParam(RELEASE)):
        return self._release(fired_at.micros, buffer, histories, timer_at, release)

    @on_timer(DRAIN)
    def on_drain(self, buffer=beam.DoFn.StateParam(BUFFER), histories=beam.DoFn.StateParam(HISTORIES),
                 timer_at=beam.DoFn.StateParam(TIMER_AT), release=beam.DoFn.TimerParam(RELEASE)):
        return self._release(GlobalWindow().max_timestamp().micros, buffer, histories, timer_at, release)

    def _release(self, up_to_us, buffer, histories, timer_at, release):
        """Applies the buffered events up to `up_to_us` (the watermark has passed
        them) and emits their requests' values; the rest wait for the next timer."""
        ready: dict[str, list[tuple]] = {}
        rest = []
        for item in buffer.read():
            if item[TIME] <= up_to_us:
                ready.setdefault(key_of(item, self._group), []).append(item)
            else:
                rest.append(item)
        states = histories.read() or {}
        outputs = []
        for key, items in ready.items():
            history = KeyHistory.from_state(self._group.features, states.get(key), self._lateness_s)
            answers, late_requests, late_observations = history.apply(to_pending(item, self._group) for item in items)
            states[key] = history.to_state()
            if self._group.first:  # every stage sees every event: count once
                self._late_requests.inc(late_requests)
                self._late_observations.inc(late_observations)
            outputs.extend(beam.window.TimestampedValue((pending.event_id, (self._index, answer)),
                                                        Timestamp(micros=pending.time_us))
                           for pending, answer in answers)
        histories.write(states)
        buffer.clear()
        timer_at.clear()
        if rest:
            for item in rest:
                buffer.add(item)
            next_us = release_time(min(item[TIME] for item in rest), self._step_us)
            release.set(Timestamp(micros=next_us))
            timer_at.write(next_us)
        return outputs


class _JoinGroupsDoFn(beam.DoFn):
    """(event_id, part) -> the request element with every group's values, as
    soon as the request (part -1) and one part per group are in."""

    PARTS = BagStateSpec("parts", FastPrimitivesCoder())

    def __init__(self, groups: tuple[FeatureGroup, ...]):
        self._groups = groups

    def process(self, element, parts=beam.DoFn.StateParam(PARTS)):
        _, part = element
        parts.add(part)
        # By part index: a redelivered message (Pub/Sub is at-least-once) must
        # not stand in for a group's part that has not arrived yet.
        collected = dict(parts.read())
        if len(collected) < len(self._groups) + 1:
            return
        parts.clear()
        request = collected.pop(_REQUEST_PART)
        for index, answer in collected.items():
            request = fill(request, self._groups[index].slots, answer)
        yield _stamped(request)


_REQUEST_PART = -1


class _Route(beam.DoFn):
    """Element -> the request to the join, and the element to each group's
    stage keyed by its state key: one step, as every step costs the streaming
    DirectRunner a few milliseconds per bundle."""

    def __init__(self, groups: tuple[FeatureGroup, ...], key_shards: Optional[int]):
        self._groups = groups
        self._shards = key_shards

    def process(self, item):
        if item[RANK] == REQUEST:
            yield beam.pvalue.TaggedOutput(_JOIN, (item[ID], (_REQUEST_PART, item)))
        for index, group in enumerate(self._groups):
            yield beam.pvalue.TaggedOutput(str(index), (state_key(key_of(item, group), self._shards), item))


_JOIN = "join"


class _StreamingFeatures(beam.PTransform):
    """Unbounded input: PCollection[element] -> PCollection[element] of the
    requests with every group filled in."""

    def __init__(self, groups: tuple[FeatureGroup, ...], allowed_lateness_s: int, key_shards: Optional[int],
                 release_step_us: int):
        super().__init__()
        self._groups = groups
        self._lateness_s = allowed_lateness_s
        self._shards = key_shards
        self._step_us = release_step_us

    def expand(self, items):
        tags = [str(index) for index in range(len(self._groups))]
        # Typed outputs: the stateful steps after them need a deterministic key coder.
        keyed = tuple[str, tuple]
        routed = items | "Route" >> beam.ParDo(_Route(self._groups, self._shards)).with_output_types(
            keyed, **{tag: keyed for tag in (_JOIN, *tags)}).with_outputs(_JOIN, *tags)
        parts = [routed[_JOIN]]
        for index, group in enumerate(self._groups):
            parts.append(
                routed[tags[index]]
                | f"PointInTime_{group.key_field}" >> beam.ParDo(_PointInTimeDoFn(
                    group, index, self._lateness_s, self._step_us)).with_input_types(tuple[str, tuple]))
        return (
            parts
            | "MergeParts" >> beam.Flatten().with_output_types(keyed)
            | "JoinGroups" >> beam.ParDo(_JoinGroupsDoFn(self._groups)).with_input_types(tuple[str, tuple])
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
    PCollection[FeatureRow], one per request, timestamped at the request time.

    allowed_lateness_s: on unbounded input, how far behind the watermark a
    request may arrive and still be answered exactly (older observations
    are forgotten after the longest window plus this).
    key_shards: on unbounded input, None keeps each key value in a state of
    its own (the most parallel); N hashes key values into N states per
    group: fewer, larger states and fewer timer firings (each firing is a
    bundle through every later step, which the DirectRunner pays for).
    release_step_ms: on unbounded input, requests are answered once the
    watermark passes the end of their step of event time: at most one timer
    firing per state and step, for up to a step of added latency. Values
    do not depend on it."""

    def __init__(self, spec: FeatureSpec, allowed_lateness_s: int = 3600, key_shards: Optional[int] = None,
                 release_step_ms: int = 0, label: Optional[str] = None):
        super().__init__(label)
        if key_shards is not None and key_shards < 1:
            raise ValueError(f"key_shards must be None or at least 1, got {key_shards}")
        if release_step_ms < 0:
            raise ValueError(f"release_step_ms must be 0 or more, got {release_step_ms}")
        self._spec = spec
        self._lateness_s = allowed_lateness_s
        self._shards = key_shards
        self._step_us = release_step_ms * 1000

    def expand(self, events):
        empty = (None,) * len(self._spec.windowed_features)
        layout = EventLayout.of(self._spec)
        groups = feature_groups(self._spec)
        items = events | "Start" >> beam.Map(lambda event: layout.to_item(event, empty))
        if events.is_bounded:
            observations = items | "Observations" >> beam.Filter(lambda item: item[RANK] == OBSERVATION)
            requests = items | "Requests" >> beam.Filter(lambda item: item[RANK] == REQUEST)
            for group in groups:
                name = group.key_field
                requests = ((requests, observations)
                            | f"Merge_{name}" >> beam.Flatten()
                            | f"Features_{name}" >> _BucketedStage(group))
        else:
            requests = items | "Features" >> _StreamingFeatures(groups, self._lateness_s, self._shards, self._step_us)
        return requests | "ToRows" >> beam.ParDo(_ToRow(layout)).with_output_types(FeatureRow)
