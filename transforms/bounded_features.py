"""The bounded (batch) path of `WindowedFeatures`: scatter, answer, join.

Every event goes to the (group, key value, time bucket) of each group that
reads it, all in one GroupByKey: a request slim (id and time), an observation
as that group's series values only. Each observation is also copied into the
later buckets whose requests can still see it, so a bucket holds one span
plus the longest window, however long the history: memory stays bounded per
key and buckets run in parallel. The answers then meet their request in a
GroupByKey on event_id, completed by the join the streaming path uses
(`joined_request`). Two shuffles, however many groups; no per-request state
(keyed state costs the Python SDK about a millisecond per key).

    events --scatter--> GroupByKey(group, key, bucket) --answers--+
       \------------------------requests---------------------------> GroupByKey(event_id) --> requests, filled

A request without a value for a group's key is not sent to that group (its
features stay missing, and the join does not wait for them); an observation
without one is left out of it.
"""

from __future__ import annotations

from typing import Iterable

import apache_beam as beam

from transforms.feature_layout import ID, RANK, TIME, VALUES, FeatureGroup, fill, key_of, reads, to_pending
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, series_value
from transforms.unbounded_features import REQUEST_PART, joined_request

_US = 1_000_000
MIN_BUCKET_S = 86_400  # buckets: at least a day, so copies of observations stay a small share


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


_REQUESTS = "requests"


class BucketedFeatures(beam.PTransform):
    """PCollection[element] (requests and observations of every kind) ->
    PCollection[element] of the requests with every group filled in.

    Two shuffles, however many groups: every group's (key value, bucket)
    gathers in one GroupByKey, each request travelling there slim (id and
    time) and each observation as its group's series values only; the
    answers then meet their request in a GroupByKey on event_id, joined by
    the streaming path's own `joined_request`."""

    def __init__(self, groups: tuple[FeatureGroup, ...]):
        super().__init__()
        self._groups = groups

    def expand(self, items):
        groups = self._groups
        plans = tuple((index, group, max(f.window_s for f in group.features) * _US, bucket_span_us(group))
                      for index, group in enumerate(groups))

        def scatter(item):
            rank = item[RANK]
            if rank == REQUEST:
                yield beam.pvalue.TaggedOutput(_REQUESTS, (item[ID], (REQUEST_PART, item)))
            for index, group, horizon_us, span_us in plans:
                if not reads(item, group):
                    continue
                key = key_of(item, group)
                if key is None:
                    continue
                slim = (item[ID], REQUEST, item[TIME], ()) if rank == REQUEST else (
                    item[ID], OBSERVATION, item[TIME], tuple(series_value(item[VALUES], i) for i in group.series_index))
                for bucket in buckets_of(item[TIME], rank, horizon_us, span_us):
                    yield (index, key, bucket), slim

        def answer(keyed):
            (index, _, _), slims = keyed
            history = KeyHistory(groups[index].features)
            answers, _, _ = history.apply(PendingEvent(time_us, rank, event_id, values)
                                          for event_id, rank, time_us, values in slims)
            return [(pending.event_id, (index, answer)) for pending, answer in answers]

        def join(keyed):
            _, parts = keyed
            request = joined_request(dict(parts), groups)
            if request is None:  # every request is in its own parts: this would be an engine bug
                raise RuntimeError(f"request {keyed[0]!r} lost a part: {sorted(dict(parts))}")
            return request

        scattered = items | "Scatter" >> beam.FlatMap(scatter).with_output_types(
            tuple[tuple[int, str, int], tuple], **{_REQUESTS: tuple[str, tuple]}).with_outputs(_REQUESTS, main="keyed")
        answers = (scattered.keyed
                   | "GroupBuckets" >> beam.GroupByKey()
                   | "Answer" >> beam.FlatMap(answer).with_output_types(tuple[str, tuple]))
        return ((answers, scattered[_REQUESTS])
                | "MergeParts" >> beam.Flatten()
                | "GroupParts" >> beam.GroupByKey()
                | "Join" >> beam.Map(join))
