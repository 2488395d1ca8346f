"""The online store's layout in Bigtable, and the exact answer read from it. Pure: no client, no Beam.

What a point-in-time answer at t needs is, per feature group (one kind of
observation, one key: transforms/feature_layout.py) and key value, the
observations of [t - W, t). The store keeps exactly those, and the answer is
computed by the jobs' own engine (`KeyHistory`) from them, so it equals
batch bit for bit for the same history.

    row key        <group name>#<key value>       e.g. origin#EWR, origin_dest#["EWR","ORD"]
    family "o"     one cell per observation:
      qualifier    its event_id: a replay, a restart or a duplicate rewrites the same cell
      timestamp    its event time, in ms (Bigtable's granularity): reads ask for [t - W, t) by it,
                   and garbage collection drops it by it
      value        JSON [time_us, value, ...]: the exact event time and the observation's fields in
                   the spec's order for its kind (Python's JSON round-trips every float and int)
    GC rule        max age = the longest window + allowed lateness: no request the service or
                   the stream accepts can reach an older observation
    row "_meta"    family "p": the spec's fingerprint (a store of another spec is refused),
                   and `through`, the stream's progress: every observation with an event time
                   before it is written (the stream's watermark passed it after the writes),
                   bar the late ones, which the consistency job explains

The fields are stored rather than the group's series values, so every group
reads the observation the way the jobs do (`to_pending`), from one format.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

from transforms.events import Event
from transforms.feature_layout import EventLayout, FeatureGroup, event_key, fill, to_pending
from transforms.point_in_time import REQUEST, KeyHistory, PendingEvent

OBSERVATIONS = "o"  # the column family of observation cells
META = "p"  # the column family of the meta row
META_ROW = b"_meta"  # no group's row: group names are [a-z0-9_]
FINGERPRINT = b"spec_fingerprint"
THROUGH = b"through"
_US, _MS = 1_000_000, 1000
_TABLE = re.compile(r"^projects/([^/]+)/instances/([^/]+)/tables/([^/]+)$")


class TablePath(NamedTuple):
    project: str
    instance: str
    table: str

    def __str__(self) -> str:
        return f"projects/{self.project}/instances/{self.instance}/tables/{self.table}"


def parse_table_path(text: str) -> TablePath:
    """projects/P/instances/I/tables/T -> TablePath; ValueError saying the form otherwise."""
    match = _TABLE.match(text or "")
    if not match:
        raise ValueError(f"expected a Bigtable table as projects/<project>/instances/<instance>/tables/<table>, "
                         f"got {text!r}")
    return TablePath(*match.groups())


def horizon_s(max_window_s: int, allowed_lateness_s: int) -> int:
    """How long an observation can matter: the garbage-collection age of family "o"."""
    return max_window_s + allowed_lateness_s


def row_key(group: FeatureGroup, key: str) -> bytes:
    return f"{group.name}#{key}".encode()


class Cell(NamedTuple):
    """One observation cell: where it goes, and what it holds."""

    row: bytes
    qualifier: bytes
    timestamp_ms: int
    value: bytes


def encode_observation(time_us: int, values: tuple) -> bytes:
    return json.dumps([time_us, *values], separators=(",", ":"), ensure_ascii=False).encode()


def decode_observation(value: bytes) -> tuple[int, tuple]:
    time_us, *values = json.loads(value)
    return time_us, tuple(values)


def observation_cells(layout: EventLayout, groups: Sequence[FeatureGroup], event: Event) -> list[Cell]:
    """The cells an observation writes: one per group that reads its kind and whose key it has."""
    rank = layout.rank(event.role)
    if rank == REQUEST:
        return []
    values = tuple(event.fields.get(name) for name in layout.names[rank])
    value, qualifier = encode_observation(event.time_us, values), event.event_id.encode()
    cells = []
    for group in groups:
        if group.observation_rank == rank:
            key = event_key(layout, group, event)
            if key is not None:
                cells.append(Cell(row_key(group, key), qualifier, event.time_us // _MS, value))
    return cells


class RowRead(NamedTuple):
    """A row an answer reads, and the event times it needs: [start_ms, end_ms) in cell timestamps."""

    group: int  # index in the groups
    row: bytes
    start_ms: int
    end_ms: int
    window_s: int  # the group's longest window: rows of one window are read together


def rows_to_read(layout: EventLayout, groups: Sequence[FeatureGroup], request: Event) -> list[RowRead]:
    """The rows a request's features read, each with its time range: [t - its group's longest window, t),
    widened to whole milliseconds (the cells' granularity); the engine applies the exact bounds."""
    t_us, reads = request.time_us, []
    for index, group in enumerate(groups):
        key = event_key(layout, group, request)
        if key is None:  # no value for the key: the group's features are missing, as in batch
            continue
        longest_s = max(f.window_s for f in group.features)
        reads.append(RowRead(index, row_key(group, key), (t_us - longest_s * _US) // _MS, t_us // _MS + 1, longest_s))
    return reads


def answer(layout: EventLayout, groups: Sequence[FeatureGroup], request: Event, n_features: int,
           cells: dict[bytes, Iterable[tuple[bytes, bytes]]], allowed_lateness_s: int) -> tuple:
    """The request's windowed features, in spec order, from the cells read
    (row -> (qualifier, value) pairs): each group's observations before t go
    through `KeyHistory.apply` with the request, as in the jobs."""
    item = layout.to_item(request, (None,) * n_features)
    for read in rows_to_read(layout, groups, request):
        group = groups[read.group]
        events = list(_observations(layout, group, read.row, cells.get(read.row, ()), request.time_us))
        events.append(PendingEvent(request.time_us, REQUEST, request.event_id, (), item))
        answers, _, _ = KeyHistory(group.features, allowed_lateness_s).apply(events)
        (_, features), = answers
        item = fill(item, group.slots, features)
    return item[-1]


def _observations(layout: EventLayout, group: FeatureGroup, row: bytes, cells: Iterable[tuple[bytes, bytes]],
                  before_us: int) -> Iterator[PendingEvent]:
    cells = list(cells)
    rank = group.observation_rank
    # One JSON parse for the row's cells, not one per cell: a busy key's row holds hundreds.
    decoded = json.loads(b"[" + b",".join(value for _, value in cells) + b"]")
    for (qualifier, _), (time_us, *values) in zip(cells, decoded):
        if time_us < before_us:
            yield to_pending((qualifier.decode(), rank, time_us, tuple(values), ()), group)


def store_lag_s(through_us: Optional[int], t_us: int) -> Optional[float]:
    """How far the store's progress is behind a request's time (0: complete for it; None: no progress yet)."""
    return None if through_us is None else max(0, t_us - through_us) / _US
