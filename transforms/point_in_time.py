"""The point-in-time arithmetic, with no Beam in it.

For a request at time t, `AGG(field) over W` reads the observations of the
same entity key whose time lies in [t - W, t): an observation exactly at
t - W counts, one exactly at t does not. Empty window: count is 0, every
other aggregate is None (missing).

`KeyHistory` holds one key's observations for one group of windowed features
(those sharing a key field) and answers requests in time order. It keeps
only what a future window can reach, so its size is bounded by the longest
window, not by the key's whole history. Means use `math.fsum`, so the result
does not depend on the order observations were added: batch and streaming
give bit-identical values.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, NamedTuple, Optional, Sequence

from transforms.spec import WindowedFeature

REQUEST, OBSERVATION = 0, 1  # sort rank at equal times: a request never sees an observation at its own t
_US = 1_000_000


class PendingEvent(NamedTuple):
    """What the engine needs of an event, plus an opaque payload it hands back."""

    time_us: int
    rank: int  # REQUEST or OBSERVATION
    event_id: str
    values: tuple  # observations: one value (or None) per `KeyHistory.fields`; requests: ()
    payload: object = None

    def order(self) -> tuple:
        """Processing order: time, requests before observations at equal times, id."""
        return self.time_us, self.rank, self.event_id


def aggregate(function: str, values: Sequence[float]) -> Optional[float]:
    """One aggregate over the values of a window (already free of missing ones)."""
    if function == "count":
        return float(len(values))
    if not values:
        return None
    if function == "sum":
        return math.fsum(values)
    if function == "mean":
        return math.fsum(values) / len(values)
    if function == "min":
        return float(min(values))
    if function == "max":
        return float(max(values))
    raise ValueError(f"unknown aggregate {function!r}")


def history_fields(features: Sequence[WindowedFeature]) -> tuple[str, ...]:
    """The observation fields a group of features reads, in a fixed order."""
    return tuple(sorted({f.field for f in features if f.field is not None}))


class KeyHistory:
    """Observations of one key, per field, sorted by time; answers requests.

    `times[None]` holds every observation's time (for count); `times[f]` and
    `values[f]` hold the observations where field f is present.
    """

    def __init__(self, features: Sequence[WindowedFeature], lateness_s: int = 0):
        self.features = tuple(features)
        self.fields = history_fields(features)
        # Kept: the longest window, plus how far behind a request may still arrive
        # and be answered exactly.
        self.horizon_us = (max(f.window_s for f in features) + lateness_s) * _US
        self.times: dict[Optional[str], list[int]] = {None: [], **{f: [] for f in self.fields}}
        self.values: dict[str, list[float]] = {f: [] for f in self.fields}
        self.processed_through_us: Optional[int] = None  # time of the latest event applied

    def add_observation(self, time_us: int, values: tuple) -> None:
        bisect.insort(self.times[None], time_us)
        for field, value in zip(self.fields, values):
            if value is not None:
                times = self.times[field]
                at = bisect.bisect_right(times, time_us)
                times.insert(at, time_us)
                self.values[field].insert(at, value)

    def features_at(self, t_us: int) -> tuple[Optional[float], ...]:
        """Every feature of the group for a request at t, in `features` order."""
        out = []
        for feature in self.features:
            times = self.times[feature.field]
            lo = bisect.bisect_left(times, t_us - feature.window_s * _US)
            hi = bisect.bisect_left(times, t_us)
            window = range(lo, hi) if feature.field is None else self.values[feature.field][lo:hi]
            out.append(aggregate(feature.aggregate, window))
        return tuple(out)

    def evict_before(self, time_us: int) -> None:
        """Forget observations older than any window of a request at or after time_us can reach."""
        cutoff = time_us - self.horizon_us
        for field, times in self.times.items():
            drop = bisect.bisect_left(times, cutoff)
            if drop:
                del times[:drop]
                if field is not None:
                    del self.values[field][:drop]

    def apply(self, events: Iterable[PendingEvent]) -> tuple[list[tuple[PendingEvent, tuple]], int, int]:
        """Applies events in processing order (`PendingEvent.order`).

        Returns each request with its features, and how many requests and
        observations were late: older than an event this key had already
        applied. Late observations still join the history (they count for
        later requests). A late request is answered from the history, exactly
        if it is no later than `lateness_s`; beyond that its oldest
        observations may have been evicted.
        """
        answers: list[tuple[PendingEvent, tuple]] = []
        late_requests = late_observations = 0
        for event in sorted(events, key=PendingEvent.order):
            if self.processed_through_us is not None and event.time_us < self.processed_through_us:
                if event.rank == REQUEST:
                    late_requests += 1
                else:
                    late_observations += 1
            else:
                self.processed_through_us = event.time_us
            if event.rank == REQUEST:
                answers.append((event, self.features_at(event.time_us)))
                oldest = self.times[None]
                if oldest and oldest[0] < self.processed_through_us - self.horizon_us:
                    self.evict_before(self.processed_through_us)  # memory stays bounded within a long run
            else:
                self.add_observation(event.time_us, event.values)
        if self.processed_through_us is not None:
            self.evict_before(self.processed_through_us)
        return answers, late_requests, late_observations

    # State round trip: plain lists and ints, so Beam's fast coders carry it.
    def to_state(self) -> tuple:
        return (self.processed_through_us, self.times[None],
                tuple(self.times[f] for f in self.fields), tuple(self.values[f] for f in self.fields))

    @classmethod
    def from_state(cls, features: Sequence[WindowedFeature], state: Optional[tuple],
                   lateness_s: int = 0) -> "KeyHistory":
        history = cls(features, lateness_s)
        if state is not None:
            history.processed_through_us, history.times[None], field_times, field_values = state
            history.times.update(zip(history.fields, (list(t) for t in field_times)))
            history.values.update(zip(history.fields, (list(v) for v in field_values)))
            history.times[None] = list(history.times[None])
        return history
