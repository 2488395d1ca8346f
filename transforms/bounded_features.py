"""The bounded (batch) path of `WindowedFeatures`: scatter, answer, join.

Every event goes to each (kind, key) group that reads it, slim (a request:
its id and time; an observation: the group's series values), keyed by
(group, shard of its key value, time bucket), gathered into one list per key
per bundle before the shuffle (`GatherInBundle`: the DirectRunner's cost is
per element, and each event makes several slims). Each observation is also
copied into the later buckets whose requests can still see it, so a bucket
holds one span plus the longest window, however long the history: memory
stays bounded per key and buckets run in parallel. The answers then meet
their request in a second combine, an hour of request time at a time,
completed by the join the streaming path uses (`joined_request`). Two
shuffles, however many groups; no per-request state (keyed state costs the
Python SDK about a millisecond per key).

    events --scatter--> lists per (group, shard, bucket) --answers--+
       \------------------------requests-----------------------------> lists per hour --> requests, filled

A request without a value for a group's key is not sent to that group (its
features stay missing, and the join does not wait for them); an observation
without one is left out of it.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import apache_beam as beam

from transforms.feature_layout import ID, RANK, TIME, VALUES, FeatureGroup, fill, to_pending
from transforms.gather import GatherInBundle
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, series_value
from transforms.unbounded_features import REQUEST_PART, joined_request

_US = 1_000_000
MIN_BUCKET_S = 7 * 86_400  # buckets: at least a week: few histories per key, copies a small share


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


SHARDS = 16  # key values of a group per (shard, bucket): few, large elements, still parallel
_JOIN_SPAN_US = 3_600 * _US  # requests are joined an hour of request time at a time


def answer_shard(group: FeatureGroup, index: int, slims: Iterable[tuple]) -> list[tuple]:
    """The slim events of one (group, shard, bucket), of any of the shard's
    key values -> (event_id, (group index, answer)) per request."""
    by_key: dict[str, list[PendingEvent]] = {}
    for key, event_id, rank, time_us, values in slims:
        by_key.setdefault(key, []).append(PendingEvent(time_us, rank, event_id, values))
    out = []
    for pending in by_key.values():
        answers, _, _ = KeyHistory(group.features).apply(pending)
        out.extend((request.event_id, (index, answer)) for request, answer in answers)
    return out


class BucketedFeatures(beam.PTransform):
    """PCollection[element] (requests and observations of every kind) ->
    PCollection[element] of the requests with every group filled in.

    Two shuffles, however many groups, each of few large elements: every
    event goes to each group that reads it as a slim tuple (a request: its
    id and time; an observation: that group's series values), keyed by
    (group, shard of its key value, time bucket), and the slims of a key are
    gathered into lists in each bundle before the shuffle. The answers then
    meet their request an hour of request time at a time (one list per hour
    per answered bucket), joined by the streaming path's own
    `joined_request`."""

    def __init__(self, groups: tuple[FeatureGroup, ...]):
        super().__init__()
        self._groups = groups

    def expand(self, items):
        groups = self._groups
        plans = tuple((index, group, max(f.window_s for f in group.features) * _US, bucket_span_us(group))
                      for index, group in enumerate(groups))

        # Per group, resolved once: (index, request key positions, observation key positions,
        # observation rank, series positions, horizon, span); the scatter runs for every event.
        scatters = tuple((index, group.key_index[0], group.key_index[1], group.observation_rank, group.series_index,
                          horizon_us, span_us) for index, group, horizon_us, span_us in plans)

        def scatter(item):
            rank, values, time_us, event_id = item[RANK], item[VALUES], item[TIME], item[ID]
            for index, request_key, observation_key, observation_rank, series_index, horizon_us, span_us in scatters:
                if rank == REQUEST:
                    positions = request_key
                elif rank == observation_rank:
                    positions = observation_key
                else:
                    continue  # another kind's observation
                # The key value, within this step: a composite one as a tuple (unambiguous, and hashed
                # and coded natively; key_of's JSON form is for state keys).
                key = values[positions[0]] if len(positions) == 1 else tuple(values[i] for i in positions)
                if key is None or (type(key) is tuple and None in key):
                    continue
                shard = zlib.crc32((key if type(key) is str else "\x1f".join(map(str, key))).encode()) % SHARDS
                slim = (key, event_id, REQUEST, time_us, ()) if rank == REQUEST else (
                    key, event_id, OBSERVATION, time_us, tuple(series_value(values, i) for i in series_index))
                for bucket in buckets_of(time_us, rank, horizon_us, span_us):
                    yield (index, shard, bucket), slim

        def answers_of(keyed):
            (index, _, _), parts = keyed
            slims = [slim for part in parts for slim in part]
            times = {event_id: time_us for _, event_id, rank, time_us, _ in slims if rank == REQUEST}
            by_hour: dict[int, list] = {}
            for event_id, part in answer_shard(groups[index], index, slims):
                by_hour.setdefault(times[event_id] // _JOIN_SPAN_US, []).append((event_id, part))
            return by_hour.items()

        def by_hour(item):
            if item[RANK] == REQUEST:
                yield item[TIME] // _JOIN_SPAN_US, (item[ID], (REQUEST_PART, item))

        def join(keyed):
            _, lists = keyed
            by_request: dict[str, dict[int, object]] = {}
            for parts in lists:
                for event_id, (index, payload) in parts:
                    by_request.setdefault(event_id, {})[index] = payload
            joined = []
            for event_id, collected in by_request.items():
                request = joined_request(collected, groups)
                if request is None:  # every request is in its own parts: this would be an engine bug
                    raise RuntimeError(f"request {event_id!r} lost a part: {sorted(collected)}")
                joined.append(request)
            return joined

        answers = (items
                   | "Scatter" >> beam.ParDo(GatherInBundle(scatter)).with_output_types(tuple[tuple[int, int, int], list])
                   | "GatherBuckets" >> beam.GroupByKey()
                   | "Answer" >> beam.FlatMap(answers_of).with_output_types(tuple[int, list]))
        requests = items | "ByHour" >> beam.ParDo(GatherInBundle(by_hour)).with_output_types(tuple[int, list])
        return ((answers, requests)
                | "MergeParts" >> beam.Flatten()
                | "GatherParts" >> beam.GroupByKey()
                | "Join" >> beam.FlatMap(join))
