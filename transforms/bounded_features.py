"""The bounded (batch) path of `WindowedFeatures`: scatter, answer, join.

Every event goes to each (kind, key) group that reads it, slim (a request:
its id and time; an observation: the group's series values), keyed by
(group, shard of its key value, time bucket), gathered into column chunks
per key per bundle before the shuffle (the DirectRunner's cost is per
element, and each event makes several slims). Each observation is also
copied into the later buckets whose requests can still see it, so a bucket
holds one span plus the longest window, however long the history: memory
stays bounded per key and buckets run in parallel. Each (group, shard,
bucket) is answered at once, in columns (transforms/columnar_windows.py).
The requests pass the first shuffle too, keyed by their day, and meet
their answers in a second shuffle, a day of request time at a time, leaving
as one list per day. Two shuffles, however many groups; no per-request
state (keyed state costs the Python SDK about a millisecond per key).

    events --scatter--> chunks per (group, shard, bucket) --answers--> chunks per day --> requests, filled
                        requests per day -----------------------------/

Memory: a (group, shard, bucket) holds a sixteenth of the group's key values
over one bucket (a week, or the longest window) plus the longest window; a
join key holds one day of requests. A hot key is bounded by its bucket.

A request without a value for a group's key is not sent to that group (its
features stay missing, and the join does not wait for them); an observation
without one is left out of it.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.columnar_windows import answer_columns
from transforms.feature_layout import FEATURES, ID, RANK, TIME, VALUES, EventLayout, FeatureGroup, fill, to_pending
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, series_value
from transforms.unbounded_features import REQUEST_PART

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
JOIN_SPAN_US = 86_400 * _US  # requests are joined a day of request time at a time: a join key holds one day

# What crosses the first shuffle: slims in packed column chunks, not a tuple per
# event (the coder's and the runner's cost is per object). A chunk holds the
# slims of one (group, shard, bucket) and one rank: (rank, the key values, each
# slim's key as an int32 index into them, event_ids, times as int64 bytes, and
# per series its values: float64 bytes, NaN for missing, when every value is
# a float; else the list). event_ids travel joined by NUL when none holds one.
# The second shuffle carries a group's answers for one join day, (group index,
# event_ids, answers), and the requests, (REQUEST_PART, elements, parts each waits for).


def _pack_ids(ids: list[str]):
    joined = "\x00".join(ids)
    return joined if joined.count("\x00") == len(ids) - 1 else ids


def _unpack_ids(packed) -> list[str]:
    return packed.split("\x00") if type(packed) is str else packed


def _pack_column(values: list):
    if all(type(v) is float or v is None for v in values):
        return np.array([np.nan if v is None else v for v in values], np.float64).tobytes()
    return values


def pack_slims(rank: int, keys: list, ids: list[str], times: list[int], series: list[list]) -> tuple:
    """One chunk of slims of one rank -> what crosses the shuffle."""
    uniques: dict = {}
    codes = np.fromiter((uniques.setdefault(key, len(uniques)) for key in keys), np.int32, len(keys))
    return (rank, list(uniques), codes.tobytes(), _pack_ids(ids), np.asarray(times, np.int64).tobytes(),
            tuple(_pack_column(column) for column in series))


def answer_chunks(group: FeatureGroup, chunks: Iterable[tuple]) -> tuple[list[str], list[int], list[tuple]]:
    """The packed slim chunks of one (group, shard, bucket), of any of the
    shard's key values -> (event_ids, times, answers) of its requests, all at
    once (transforms/columnar_windows.py)."""
    width = len(group.series_index)
    code_of: dict = {}
    codes, ids, ranks, times, series = [], [], [], [], [[] for _ in range(width)]
    for rank, uniques, packed_codes, packed_ids, packed_times, columns in chunks:
        remap = np.fromiter((code_of.setdefault(key, len(code_of)) for key in uniques), np.int64, len(uniques))
        chunk_codes = remap[np.frombuffer(packed_codes, np.int32)]
        codes.append(chunk_codes)
        ids.extend(_unpack_ids(packed_ids))
        ranks.append(np.full(len(chunk_codes), rank, np.int8))
        times.append(np.frombuffer(packed_times, np.int64))
        for at in range(width):
            series[at].append(columns[at] if columns else np.full(len(chunk_codes), np.nan).tobytes())
    times_all, ranks_all = np.concatenate(times), np.concatenate(ranks)
    event_ids, answers = answer_columns(group.features, np.concatenate(codes), ids, ranks_all, times_all,
                                        [_concatenate(parts) for parts in series])
    time_of = {event_id: time_us for event_id, rank, time_us in zip(ids, ranks_all.tolist(), times_all.tolist())
               if rank == REQUEST}
    return event_ids, [time_of[event_id] for event_id in event_ids], answers


def _concatenate(parts: list):
    """A series' packed parts -> one float64 array, or one list where any part is a list."""
    if all(type(part) is bytes for part in parts):
        return np.concatenate([np.frombuffer(part, np.float64) for part in parts])
    out: list = []
    for part in parts:
        out.extend([None if v != v else v for v in np.frombuffer(part, np.float64).tolist()]
                   if type(part) is bytes else part)
    return out


def _key_values(values: list, positions: tuple[int, ...]) -> list:
    """Each event's value of a key, None where a part is missing. Within the
    batch path a composite one is a tuple (unambiguous, and hashed and coded
    natively; key_of's JSON form is for state keys)."""
    if len(positions) == 1:
        (at,) = positions
        return [v[at] for v in values]
    keys = [tuple(v[at] for at in positions) for v in values]
    return [None if None in key else key for key in keys]


class _Scatter(beam.DoFn):
    """Events -> their slims, in column chunks per (group, shard, bucket)
    (each group that reads an event, each bucket that needs it); and the
    requests, with the number of parts each waits for, in chunks per day of
    request time, keyed (REQUEST_PART, 0, day), for the join. A chunk per key
    per bundle, not an element per slim: the runner's cost is per element, and
    each event makes several slims."""

    def __init__(self, layout: EventLayout, groups: tuple[FeatureGroup, ...], batched: bool, cap: int = 200_000):
        self._layout, self._batched, self._cap = layout, batched, cap
        self._empty = (None,) * sum(len(group.features) for group in groups)
        # Per group, resolved once: (index, request key positions, observation key positions,
        # observation rank, series positions, horizon, span).
        self._plans = tuple((index, group.key_index[0], group.key_index[1], group.observation_rank,
                             group.series_index, max(f.window_s for f in group.features) * _US, bucket_span_us(group))
                            for index, group in enumerate(groups))

    def setup(self):
        self._shards: dict = {}  # key value -> shard: crc32 once per key value, not per event

    def start_bundle(self):
        self._events: list = []

    def process(self, element):
        # Held until the bundle ends (or `cap` events): the more events are scattered at once,
        # the longer each chunk, whatever order the events come in.
        if self._batched:
            self._events.extend(element)
        else:
            self._events.append(element)
        if len(self._events) >= self._cap:
            yield from self._flush(lambda pair: pair)

    def finish_bundle(self):
        yield from self._flush(lambda pair: WindowedValue(pair, MIN_TIMESTAMP, [GlobalWindow()]))

    def _flush(self, wrap):
        chunks, requests = self._scatter(self._events)
        self._events = []
        for pair in chunks.items():
            yield wrap(pair)
        for day, chunk in requests.items():
            yield wrap(((REQUEST_PART, 0, day), [chunk]))

    def _shard(self, key) -> int:
        shard = self._shards.get(key)
        if shard is None:
            shard = self._shards[key] = zlib.crc32(
                (key if type(key) is str else "\x1f".join(map(str, key))).encode()) % SHARDS
        return shard

    def _scatter(self, events: list) -> tuple[dict, dict]:
        """Events -> ({(group, shard, bucket): [slim chunk, ...]}, {join day: request chunk})."""
        to_item, empty = self._layout.to_item, self._empty
        items = [to_item(event, empty) for event in events]
        ranks = np.fromiter((item[RANK] for item in items), np.int64, len(items))
        times = np.fromiter((item[TIME] for item in items), np.int64, len(items))
        requests = np.flatnonzero(ranks == REQUEST)
        parts = np.zeros(len(items), np.int64)  # how many groups answer each request
        chunks: dict = {}
        for index, request_key, observation_key, observation_rank, series_index, horizon_us, span_us in self._plans:
            for rank, rows, positions in ((REQUEST, requests, request_key),
                                          (OBSERVATION, np.flatnonzero(ranks == observation_rank), observation_key)):
                values = [items[i][VALUES] for i in rows.tolist()]
                keys = _key_values(values, positions)
                kept = np.fromiter((key is not None for key in keys), bool, len(keys))
                if not kept.all():
                    rows, keys = rows[kept], [key for key in keys if key is not None]
                    values = [v for v, keep in zip(values, kept.tolist()) if keep]
                if not len(rows):
                    continue
                if rank == REQUEST:
                    parts[rows] += 1
                    series = []
                else:
                    series = [[series_value(v, at) for v in values] for at in series_index]
                ids = [items[i][ID] for i in rows.tolist()]
                shards = np.fromiter((self._shard(key) for key in keys), np.int64, len(keys))
                first = times[rows] // span_us
                reach = first if rank == REQUEST else (times[rows] + horizon_us) // span_us
                for extra in range(int((reach - first).max()) + 1):  # nearly every slim has one bucket
                    at = np.flatnonzero(reach - first >= extra)
                    code = shards[at] * (int(reach.max()) + 2) + first[at] + extra
                    order = np.argsort(code, kind="stable")
                    at, code = at[order].tolist(), code[order]
                    run_keys, run_ids = [keys[j] for j in at], [ids[j] for j in at]
                    run_series = [[column[j] for j in at] for column in series]
                    run_times = times[rows][at].tolist()
                    bounds = [0, *(np.flatnonzero(np.diff(code)) + 1).tolist(), len(at)]
                    for a, b in zip(bounds, bounds[1:]):
                        chunks.setdefault((index, int(shards[at[a]]), int(first[at[a]]) + extra), []).append(
                            pack_slims(rank, run_keys[a:b], run_ids[a:b], run_times[a:b],
                                       [column[a:b] for column in run_series]))
        by_day: dict = {}
        for i in requests.tolist():
            chunk = by_day.setdefault(int(times[i]) // JOIN_SPAN_US, (REQUEST_PART, [], []))
            chunk[1].append(items[i])
            chunk[2].append(int(parts[i]))
        return chunks, by_day


def join_day(groups: tuple[FeatureGroup, ...], chunks: Iterable[tuple]) -> list[tuple]:
    """The chunks of one join day (its requests, and the groups' answers to
    them) -> each request with every group's answers in their slots."""
    requests, answers_of = [], {}
    for part, first, second in chunks:
        if part == REQUEST_PART:
            requests.extend(zip(first, second))
        else:
            for event_id, answer in zip(_unpack_ids(first), second):
                answers_of.setdefault(event_id, []).append((part, answer))
    joined = []
    for item, expected in requests:
        answers = answers_of.pop(item[ID], ())
        if len(answers) != expected:  # each group answers each request whose key it has: an engine bug
            raise RuntimeError(f"request {item[ID]!r} has {len(answers)} of its {expected} parts: {sorted(i for i, _ in answers)}")
        features = list(item[FEATURES])
        for index, answer in answers:
            for slot, value in zip(groups[index].slots, answer):
                features[slot] = value
        joined.append(item[:FEATURES] + (tuple(features),))
    if answers_of:
        raise RuntimeError(f"answers to {len(answers_of)} requests that are not in their day, e.g. "
                           f"{next(iter(answers_of))!r}")
    return joined


class BucketedFeatures(beam.PTransform):
    """PCollection[Event] (requests and observations of every kind), or of
    list[Event] (`batched`) -> PCollection[list[element]]: the requests with
    every group filled in, a list per day of request time.

    Two shuffles, however many groups, each of few large elements: every
    event goes to each group that reads it, slim (a request: its id and time;
    an observation: that group's series values), keyed by (group, shard of
    its key value, time bucket), in column chunks gathered in each bundle.
    Each (group, shard, bucket) is answered at once
    (transforms/columnar_windows.py); the answers then meet their request a
    day of request time at a time."""

    def __init__(self, layout: EventLayout, groups: tuple[FeatureGroup, ...], batched: bool = False):
        super().__init__()
        self._layout = layout
        self._groups = groups
        self._batched = batched

    def expand(self, events):
        groups = self._groups

        def answers_of(keyed):
            (index, _, day), lists = keyed
            if index == REQUEST_PART:  # the day's requests, on their way to the join
                return [(day, chunk) for part in lists for chunk in part]
            event_ids, times, answers = answer_chunks(groups[index], (chunk for part in lists for chunk in part))
            by_day: dict[int, tuple] = {}
            for event_id, time_us, answer in zip(event_ids, times, answers):
                day = by_day.setdefault(time_us // JOIN_SPAN_US, (index, [], []))
                day[1].append(event_id)
                day[2].append(answer)
            return [(day, (index, _pack_ids(day_ids), day_answers)) for day, (_, day_ids, day_answers) in by_day.items()]

        # The requests take the first shuffle too, so that the join's shuffle has one
        # producer and no Flatten: on the DirectRunner, a Flatten into a GroupByKey lost
        # one group's part of some requests on ten years of flights (docs/architecture.md).
        # Typed keys: an untyped key's coder falls back to pickling (docs/architecture.md, "Coders").
        return (events
                | "Scatter" >> beam.ParDo(_Scatter(self._layout, groups, self._batched)).with_output_types(
                    tuple[tuple[int, int, int], list])
                | "GatherBuckets" >> beam.GroupByKey()
                | "Answer" >> beam.FlatMap(answers_of).with_output_types(tuple[int, tuple])
                | "GatherParts" >> beam.GroupByKey()
                | "Join" >> beam.Map(lambda keyed: join_day(groups, keyed[1])))
