"""The unbounded (streaming) path of `WindowedFeatures`.

Each event goes to every group that reads it, in one stateful step keyed by
(group, key value) (or a shard of a group's key values, `key_shards`): the
state buffers events and, when the watermark passes the earliest one it holds
(an event-time timer), applies everything up to that time and emits each
request's values for the group. A stateful join
per event_id emits the row once the request and the values of every group
whose key the request has are in: no stage waits on another's watermark, so
the result does not depend on how a runner holds watermarks for timers.
Observations arriving behind the watermark are counted as late and still join
the history; a request up to `allowed_lateness_s` late is still answered
exactly.

What the DoFns decide (which buffered events are released, when the next
timer fires, when a request's parts are complete) is in pure functions below,
tested on their own.
"""

from __future__ import annotations

import uuid
from typing import Iterable, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms import counters
from transforms.event_time import TIMER_RESOLUTION_US, timer_us
from transforms.feature_layout import ID, RANK, TIME, FeatureGroup, fill, key_of, reads, state_key, to_pending
from transforms.history_log import delta_entry, entry_size, histories_from_log, live_size, next_entries
from transforms.kept_histories import KEPT, new_token
from transforms.point_in_time import REQUEST, KeyHistory

REQUEST_PART = -1  # the join's part holding the request itself; groups' parts are their indexes


def release_time(time_us: int, step_us: int) -> int:
    """When an event may be released: the end of its step of event time. The
    watermark has then passed every event of the step, so one timer firing
    releases them all, where a timer per event time would fire once per
    distinct time (each firing a bundle through every later step). Never
    finer than a timer can fire (`timer_us`: whole milliseconds)."""
    step = max(step_us, TIMER_RESOLUTION_US)
    return -(-time_us // step) * step


def split_release(items: Iterable[tuple], up_to_us: int, group: FeatureGroup
                  ) -> tuple[dict[str, list[tuple]], list[tuple]]:
    """Buffered elements -> (those the watermark has passed, by key value; the rest)."""
    ready: dict[str, list[tuple]] = {}
    rest = []
    for item in items:
        if item[TIME] <= up_to_us:
            ready.setdefault(key_of(item, group), []).append(item)
        else:
            rest.append(item)
    return ready, rest


def next_release_us(rest: list[tuple], step_us: int) -> Optional[int]:
    """When the timer must fire next for what stays buffered (None: nothing does)."""
    return release_time(min(item[TIME] for item in rest), step_us) if rest else None


def expected_parts(request: tuple, groups: tuple[FeatureGroup, ...]) -> frozenset[int]:
    """The groups whose values a request waits for: those whose key it has."""
    return frozenset(index for index, group in enumerate(groups) if key_of(request, group) is not None)


def take_joined(pending: list[tuple[str, tuple]], event_id: str, groups: tuple[FeatureGroup, ...]
                ) -> tuple[Optional[tuple], list[tuple[str, tuple]]]:
    """The parts a join state holds, as (event_id, (part index, part)) in
    arrival order -> (the request of `event_id` with every group filled in,
    and the parts of the other requests, which stay), or (None, pending)
    while any part it waits for is missing. A state holds one event_id
    (key_shards None) or the pending requests of a shard of them."""
    collected = {index: part for id_, (index, part) in pending if id_ == event_id}
    request = joined_request(collected, groups)
    if request is None:
        return None, pending
    return request, [kept for kept in pending if kept[0] != event_id]


def joined_request(collected: dict[int, object], groups: tuple[FeatureGroup, ...]) -> Optional[tuple]:
    """The parts received for one event_id, by part index -> the request with
    every group filled in, or None while any part it waits for is missing.
    By index: a redelivered part (Pub/Sub is at-least-once) must not stand in
    for a group's part that has not arrived yet."""
    request = collected.get(REQUEST_PART)
    if request is None or not expected_parts(request, groups) <= collected.keys():
        return None
    for index, answer in collected.items():
        if index != REQUEST_PART:
            request = fill(request, groups[index].slots, answer)
    return request


class _PointInTimeDoFn(beam.DoFn):
    """(state key, (group index, element)) -> (join key, (event_id, (group index, values)))
    for each request, released in time order once the watermark has passed
    it. Every group runs in this one step (a state key belongs to one group:
    its index leads the key), because each step costs the streaming
    DirectRunner a bundle per firing. A state key holds one or more key
    values, each with its own history.

    The histories live in state as an append-only log (transforms/history_log.py)
    and, between firings, decoded in the worker's memory
    (transforms/kept_histories.py), checked against the token written with
    the log: a firing reads the events it releases and a token, and writes the
    observations it applied, whatever the key's window holds."""

    BUFFER = BagStateSpec("buffer", FastPrimitivesCoder())
    LOG = BagStateSpec("log", FastPrimitivesCoder())  # history_log entries
    TOKEN = ReadModifyWriteStateSpec("token", VarIntCoder())  # the kept histories' token for the log
    TIMER_AT = ReadModifyWriteStateSpec("timer_at", VarIntCoder())
    RELEASE = TimerSpec("release", TimeDomain.WATERMARK)
    # At the end of the window (a drained or finished stream) a timer set from
    # then on never fires: this one, set while the window is open, releases
    # whatever is still buffered.
    DRAIN = TimerSpec("drain", TimeDomain.WATERMARK)
    # When no request can read the state key's observations any more: its newest
    # event plus the horizon (the longest window plus the allowed lateness).
    # Set again at every firing; when it fires, the state key's state ends.
    EXPIRE = TimerSpec("expire", TimeDomain.WATERMARK)

    def __init__(self, groups: tuple[FeatureGroup, ...], allowed_lateness_s: int, release_step_us: int,
                 key_shards: Optional[int] = None, tally: Optional[str] = None):
        self._groups = groups
        self._lateness_s = allowed_lateness_s
        self._step_us = release_step_us
        self._shards = key_shards
        self._owner = uuid.uuid4().hex  # this step's entries in the process's kept histories; its copies share it
        self._late_requests = counters.LATE_REQUESTS.metric(tally)
        self._late_observations = counters.LATE_OBSERVATIONS.metric(tally)
        self._rebuilt = counters.HISTORIES_REBUILT.metric(tally)
        self._live_keys = counters.LIVE_KEYS.metric(tally)
        self._cleared = counters.STATE_CLEARED.metric(tally)

    def process(self, element, buffer=beam.DoFn.StateParam(BUFFER), timer_at=beam.DoFn.StateParam(TIMER_AT),
                release=beam.DoFn.TimerParam(RELEASE), drain=beam.DoFn.TimerParam(DRAIN)):
        _, (index, item) = element
        buffer.add((index, item))
        pending = timer_at.read()
        if pending is None:
            drain.set(GlobalWindow().max_timestamp())
        release_at = release_time(item[TIME], self._step_us)
        if pending is None or release_at < pending:  # the timer stays at the earliest buffered event's step
            release.set(Timestamp(micros=release_at))
            timer_at.write(release_at)

    @on_timer(RELEASE)
    def on_release(self, fired_at=beam.DoFn.TimestampParam, buffer=beam.DoFn.StateParam(BUFFER),
                   log=beam.DoFn.StateParam(LOG), token=beam.DoFn.StateParam(TOKEN),
                   timer_at=beam.DoFn.StateParam(TIMER_AT), release=beam.DoFn.TimerParam(RELEASE),
                   expire=beam.DoFn.TimerParam(EXPIRE)):
        return self._release(fired_at.micros, buffer, log, token, timer_at, release, expire)

    @on_timer(DRAIN)
    def on_drain(self, buffer=beam.DoFn.StateParam(BUFFER), log=beam.DoFn.StateParam(LOG),
                 token=beam.DoFn.StateParam(TOKEN), timer_at=beam.DoFn.StateParam(TIMER_AT),
                 release=beam.DoFn.TimerParam(RELEASE), expire=beam.DoFn.TimerParam(EXPIRE)):
        return self._release(GlobalWindow().max_timestamp().micros, buffer, log, token, timer_at, release, expire)

    @on_timer(EXPIRE)
    def on_expire(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
                  log=beam.DoFn.StateParam(LOG), token=beam.DoFn.StateParam(TOKEN),
                  timer_at=beam.DoFn.StateParam(TIMER_AT), drain=beam.DoFn.TimerParam(DRAIN)):
        """No request can read this state key's observations any more: its state ends.
        Events still buffered (later ones) keep it: their firing sets this timer again."""
        if timer_at.read() is not None:
            return
        index = int(key.partition("/")[0])
        kept_key = (self._owner, key)
        histories, _ = self._histories(kept_key, self._groups[index], log, token)
        KEPT.drop(kept_key)
        log.clear()
        token.clear()
        buffer.clear()
        drain.clear()
        self._live_keys.dec(len(histories))
        self._cleared.inc(len(histories))

    def _histories(self, kept_key: tuple, group: FeatureGroup, log, token) -> tuple[dict, int]:
        """The state key's histories by key value, and the observations its log holds."""
        written = token.read()
        kept = KEPT.take(kept_key, written)
        if kept is not None:
            return kept
        entries = list(log.read()) if written is not None else []
        if entries:
            self._rebuilt.inc()
        return histories_from_log(group.features, self._lateness_s, entries), sum(map(entry_size, entries))

    def _release(self, up_to_us, buffer, log, token, timer_at, release, expire):
        """Applies the buffered events up to `up_to_us` (the watermark has passed
        them) and emits their requests' values; the rest wait for the next timer."""
        buffered = list(buffer.read())
        if not buffered:
            timer_at.clear()
            return []
        index = buffered[0][0]
        group = self._groups[index]
        ready, rest = split_release((item for _, item in buffered), up_to_us, group)
        outputs = []
        if ready:
            kept_key = (self._owner, f"{index}/{state_key(next(iter(ready)), self._shards)}")
            histories, logged = self._histories(kept_key, group, log, token)
            entries = []
            for key, items in ready.items():
                history = histories.get(key)
                if history is None:
                    history = histories[key] = KeyHistory(group.features, self._lateness_s)
                    self._live_keys.inc()
                pending = [to_pending(item, group) for item in items]
                answers, late_requests, late_observations = history.apply(pending)
                entries.append(delta_entry(key, history.processed_through_us, pending))
                if group.counts_late_requests:  # every group sees the requests: count once
                    self._late_requests.inc(late_requests)
                if group.counts_late_observations:
                    self._late_observations.inc(late_observations)
                outputs.extend(beam.window.TimestampedValue((state_key(pending_.event_id, self._shards),
                                                             (pending_.event_id, (index, answer))),
                                                            Timestamp(micros=pending_.time_us))
                               for pending_, answer in answers)
            entries, replace, logged, ended = next_entries(histories, logged, entries, up_to_us)
            if ended:  # key values of a shard no request can read any more, left out of the rewritten log
                self._live_keys.dec(ended)
                self._cleared.inc(ended)
            ends_at = max(history.processed_through_us + history.horizon_us for history in histories.values())
            expire.set(Timestamp(micros=timer_us(ends_at)))
            if replace:
                log.clear()
            for entry in entries:
                log.add(entry)
            written = new_token()
            token.write(written)
            KEPT.put(kept_key, written, (histories, logged), live_size(histories))
        buffer.clear()
        timer_at.clear()
        next_us = next_release_us(rest, self._step_us)
        if next_us is not None:
            for item in rest:
                buffer.add((index, item))
            release.set(Timestamp(micros=next_us))
            timer_at.write(next_us)
        return outputs


class _JoinGroupsDoFn(beam.DoFn):
    """(join key, (event_id, part)) -> the request element with every group's
    values, as soon as `take_joined` finds them all in; then its parts leave
    the state. The join key is the event_id (key_shards None) or a shard of
    event_ids: on the DirectRunner every key is a bundle of its own through
    every later step (up to a model call per request), so one shard lets the
    requests a timer firing answers leave together.
    Its input is de-duplicated upstream (`DeduplicateEvents`: one request
    per event_id within the horizon), so no second request part comes after
    the join; keeping a marker per answered request would hold state for each
    one (and a timer to free it), which is what the ledger upstream does.

    Its state ends without a timer: each request reaches it once, and each
    group whose key the request has answers it once (`KeyHistory.apply`
    answers every request, late or not), so every request is joined and its
    parts leave (tests/test_feature_layout.py, a property test). A timer for
    parts that never complete would cost a set and a clear per request, and
    on the DirectRunner, which does not hold a step's output watermark for
    its pending timers, could fire before the groups' parts arrive and drop
    the request. A request that never leaves would still show: the
    consistency job's completeness check lists it."""

    PARTS = BagStateSpec("parts", FastPrimitivesCoder())

    def __init__(self, groups: tuple[FeatureGroup, ...]):
        self._groups = groups

    def process(self, element, parts=beam.DoFn.StateParam(PARTS)):
        _, (event_id, part) = element
        parts.add((event_id, part))
        pending = list(parts.read())
        request, rest = take_joined(pending, event_id, self._groups)
        if request is not None:
            parts.clear()
            for kept in rest:
                parts.add(kept)
            yield beam.window.TimestampedValue(request, Timestamp(micros=request[TIME]))


_JOIN, _POINTS = "join", "points"


class _Route(beam.DoFn):
    """Element -> the request to the join, and the element once per group that
    reads it (requests with the key, its kind's observations with the key),
    keyed by the group's index and its state key: one step, as every step
    costs the streaming DirectRunner a few milliseconds per bundle."""

    def __init__(self, groups: tuple[FeatureGroup, ...], key_shards: Optional[int]):
        self._groups = groups
        self._shards = key_shards

    def process(self, item):
        if item[RANK] == REQUEST:
            yield beam.pvalue.TaggedOutput(_JOIN, (state_key(item[ID], self._shards), (item[ID], (REQUEST_PART, item))))
        for index, group in enumerate(self._groups):
            if reads(item, group):
                key = key_of(item, group)
                if key is not None:
                    yield beam.pvalue.TaggedOutput(_POINTS, (f"{index}/{state_key(key, self._shards)}", (index, item)))


class StreamingFeatures(beam.PTransform):
    """PCollection[element] -> PCollection[element] of the requests with every
    group filled in. tally: a streaming job's tally to count into as well."""

    def __init__(self, groups: tuple[FeatureGroup, ...], allowed_lateness_s: int, key_shards: Optional[int],
                 release_step_us: int, tally: Optional[str] = None):
        super().__init__()
        self._groups = groups
        self._lateness_s = allowed_lateness_s
        self._shards = key_shards
        self._step_us = release_step_us
        self._tally = tally

    def expand(self, items):
        # Typed outputs: the stateful steps after them need a deterministic key coder.
        keyed = tuple[str, tuple]
        routed = items | "Route" >> beam.ParDo(_Route(self._groups, self._shards)).with_output_types(
            keyed, **{tag: keyed for tag in (_JOIN, _POINTS)}).with_outputs(_JOIN, _POINTS)
        answers = routed[_POINTS] | "PointInTime" >> beam.ParDo(_PointInTimeDoFn(
            self._groups, self._lateness_s, self._step_us, self._shards, self._tally)).with_input_types(keyed)
        return (
            (routed[_JOIN], answers)
            | "MergeParts" >> beam.Flatten().with_output_types(keyed)
            | "JoinGroups" >> beam.ParDo(_JoinGroupsDoFn(self._groups)).with_input_types(tuple[str, tuple])
        )
