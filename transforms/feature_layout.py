"""How events travel through the windowed-feature engine, with no Beam in it:
the element tuple, `FeatureRow` (what the engine emits), and the feature
groups (the features computed together: one kind of observation, one key).

Between stages an element is a plain tuple, cheap to encode:

    (event_id, rank, time_us, values, features)

rank is REQUEST (0) or 1 + the index of the observation's kind in the spec;
values are the event's fields in the order of `EventLayout` for its rank;
features is the spec-ordered tuple being filled (None until a group fills
it, and for good when the request has no value for that group's key).
"""

from __future__ import annotations

import json
import zlib
from typing import NamedTuple, Optional

from transforms.events import Event
from transforms.point_in_time import OBSERVATION, REQUEST, PendingEvent, history_series, series_value
from transforms.spec import DEFAULT_KIND, FeatureSpec, WindowedFeature

ID, RANK, TIME, VALUES, FEATURES = range(5)


class FeatureRow(NamedTuple):
    """A request event with its windowed features, in spec order (None =
    missing: an empty window, or no value for the feature's key)."""

    event: Event
    features: tuple


class EventLayout(NamedTuple):
    """The order of an element's values, per rank, and the role each rank is."""

    roles: tuple[str, ...]  # [REQUEST] = "request", then the spec's kinds
    names: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, spec: FeatureSpec) -> "EventLayout":
        names = [tuple(f.name for f in spec.request_fields) + (spec.label.name,)]
        names += [tuple(f.name for f in kind.fields) for kind in spec.kinds]
        return cls(spec.roles, tuple(names))

    def rank(self, role: str) -> int:
        return self.roles.index(role)

    def to_item(self, event: Event, features: tuple) -> tuple:
        rank = self.roles.index(event.role)
        values = tuple(event.fields.get(name) for name in self.names[rank])
        return event.event_id, rank, event.time_us, values, features

    def to_row(self, item: tuple) -> FeatureRow:
        rank = item[RANK]
        event = Event(item[ID], self.roles[rank], item[TIME], dict(zip(self.names[rank], item[VALUES])))
        return FeatureRow(event, item[FEATURES])

    def index(self, rank: int, name: str) -> int:
        return self.names[rank].index(name)


class FeatureGroup(NamedTuple):
    """The windowed features sharing one kind of observation and one key: one stage."""

    name: str  # for step names: the key's fields, after the kind unless it is the default one
    kind: str
    key: tuple[str, ...]
    features: tuple[WindowedFeature, ...]
    slots: tuple[int, ...]  # where each feature's value goes in the spec-ordered tuple
    observation_rank: int  # the rank of the kind this group reads
    key_index: tuple[tuple[int, ...], tuple[int, ...]]  # where the key's parts are in a request's, an observation's values
    series_index: tuple[tuple[int, ...], ...]  # where each of `history_series(features)` is in an observation's values
    counts_late_requests: bool  # every stage sees the requests, so only the first counts late ones
    counts_late_observations: bool  # and each kind's first stage its late observations


def feature_groups(spec: FeatureSpec) -> tuple[FeatureGroup, ...]:
    """The windowed features grouped by (kind, key), in spec order."""
    layout = EventLayout.of(spec)
    by_group: dict[tuple[str, tuple[str, ...]], list[WindowedFeature]] = {}
    for feature in spec.windowed_features:
        by_group.setdefault(feature.group, []).append(feature)
    groups, kinds_seen = [], set()
    for index, ((kind, key), features) in enumerate(by_group.items()):
        rank = layout.rank(kind)
        groups.append(FeatureGroup(
            name="_".join(key) if kind == DEFAULT_KIND else "_".join((kind, *key)),
            kind=kind,
            key=key,
            features=tuple(features),
            slots=tuple(spec.windowed_features.index(f) for f in features),
            observation_rank=rank,
            key_index=(tuple(layout.index(REQUEST, part) for part in key),
                       tuple(layout.index(rank, part) for part in key)),
            series_index=tuple(tuple(layout.index(rank, f) for f in series) for series in history_series(features)),
            counts_late_requests=index == 0,
            counts_late_observations=kind not in kinds_seen))
        kinds_seen.add(kind)
    return tuple(groups)


def reads(item: tuple, group: FeatureGroup) -> bool:
    """Whether a group's stage takes an element: every request, and the observations of its kind."""
    return item[RANK] == REQUEST or item[RANK] == group.observation_rank


def key_of(item: tuple, group: FeatureGroup) -> Optional[str]:
    """The element's value of the group's key, None when any part is missing.
    A composite key's parts as a JSON list: unambiguous whatever they hold."""
    values = item[VALUES]
    index = group.key_index[0 if item[RANK] == REQUEST else 1]
    if len(index) == 1:
        return values[index[0]]
    parts = [values[i] for i in index]
    return None if None in parts else json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


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


def state_key(key: str, shards: Optional[int]) -> str:
    """The state a key value lives in: its own, or one of `shards` (a stable
    hash: Python's hash() differs between worker processes)."""
    return key if shards is None else f"shard-{zlib.crc32(key.encode()) % shards}"


def event_key(layout: EventLayout, group: FeatureGroup, event: Event) -> Optional[str]:
    """An event's value of a group's key, None when the group does not read the
    event (another kind) or it lacks a part of the key."""
    item = layout.to_item(event, ())
    return key_of(item, group) if reads(item, group) else None
