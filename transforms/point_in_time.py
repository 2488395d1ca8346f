"""The point-in-time arithmetic, with no Beam in it.

For a request at time t, `AGG(field) over W` reads the observations of the
same entity key whose time lies in [t - W, t): an observation exactly at
t - W counts, one exactly at t does not. Empty window: count is 0, every
other aggregate is None (missing).

`KeyHistory` holds one key's observations for one group of windowed features
(those sharing a key field) and answers requests in time order. It keeps
only what a future window can reach, so its size is bounded by the longest
window, not by the key's whole history. Sums use `math.fsum`, so the result
does not depend on the order observations were added: batch and streaming
give bit-identical values.

An aggregate reads a *series*: the observations where its input fields are
all present, with their values (one number, or a (numerator, denominator)
pair for a ratio). Features reading the same fields share a series.
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
    values: tuple  # observations: one value (or None) per `KeyHistory.series`; requests: ()
    payload: object = None

    def order(self) -> tuple:
        """Processing order: time, requests before observations at equal times, id."""
        return self.time_us, self.rank, self.event_id


def aggregate(function: str, values: Sequence) -> Optional[float]:
    """One aggregate over the values of a window (already free of missing ones;
    for a ratio, (numerator, denominator) pairs)."""
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
    if function == "ratio":
        denominator = math.fsum(pair[1] for pair in values)
        return math.fsum(pair[0] for pair in values) / denominator if denominator else None
    raise ValueError(f"unknown aggregate {function!r}")


def history_series(features: Sequence[WindowedFeature]) -> tuple[tuple[str, ...], ...]:
    """The series a group of features reads (each a tuple of observation
    fields), in a fixed order; counts read every observation, `()`."""
    return tuple(sorted({f.inputs for f in features if f.inputs}))


def series_value(values: tuple, index: tuple[int, ...]) -> object:
    """An observation's value in a series, from its values at `index`: the one
    field, or the tuple of them; None (not in the series) when any is missing."""
    if len(index) == 1:
        return values[index[0]]
    parts = tuple(values[i] for i in index)
    return None if None in parts else parts


class KeyHistory:
    """Observations of one key, per series, sorted by time; answers requests.

    `times[0]` holds every observation's time (for count); `times[i + 1]` and
    `values[i + 1]` hold the observations in `series[i]`. Lists indexed by
    position, not dicts keyed by series: a tuple key is hashed at every lookup,
    and lookups run for every feature of every request.
    """

    def __init__(self, features: Sequence[WindowedFeature], lateness_s: int = 0):
        self.features = tuple(features)
        self.series = history_series(features)
        # Per feature, what features_at needs, resolved once: it runs for every request.
        position = {series: index + 1 for index, series in enumerate(self.series)}
        self._plan = tuple((position.get(f.inputs, 0), f.window_s * _US, f.aggregate) for f in self.features)
        # Kept: the longest window, plus how far behind a request may still arrive
        # and be answered exactly.
        self.horizon_us = (max(f.window_s for f in features) + lateness_s) * _US
        self.times: list[list[int]] = [[] for _ in range(len(self.series) + 1)]
        self.values: list[list] = [[] for _ in range(len(self.series) + 1)]  # [0] stays empty
        self.processed_through_us: Optional[int] = None  # time of the latest event applied

    def add_observation(self, time_us: int, values: tuple) -> None:
        bisect.insort(self.times[0], time_us)
        for index, value in enumerate(values, start=1):
            if value is not None:
                times = self.times[index]
                at = bisect.bisect_right(times, time_us)
                times.insert(at, time_us)
                self.values[index].insert(at, value)

    def features_at(self, t_us: int) -> tuple[Optional[float], ...]:
        """Every feature of the group for a request at t, in `features` order."""
        out = []
        for index, window_us, function in self._plan:
            times = self.times[index]
            lo = bisect.bisect_left(times, t_us - window_us)
            hi = bisect.bisect_left(times, t_us)
            window = self.values[index][lo:hi] if index else range(lo, hi)
            out.append(aggregate(function, window))
        return tuple(out)

    def evict_before(self, time_us: int) -> None:
        """Forget observations older than any window of a request at or after time_us can reach."""
        cutoff = time_us - self.horizon_us
        for times, values in zip(self.times, self.values):
            drop = bisect.bisect_left(times, cutoff)
            if drop:
                del times[:drop]
                del values[:drop]  # a no-op on values[0], always empty

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
                oldest = self.times[0]
                if oldest and oldest[0] < self.processed_through_us - self.horizon_us:
                    self.evict_before(self.processed_through_us)  # memory stays bounded within a long run
            else:
                self.add_observation(event.time_us, event.values)
        if self.processed_through_us is not None:
            self.evict_before(self.processed_through_us)
        return answers, late_requests, late_observations

    # State round trip: plain lists and ints, so Beam's fast coders carry it.
    def to_state(self) -> tuple:
        return self.processed_through_us, self.times[0], tuple(self.times[1:]), tuple(self.values[1:])

    @classmethod
    def from_state(cls, features: Sequence[WindowedFeature], state: Optional[tuple],
                   lateness_s: int = 0) -> "KeyHistory":
        history = cls(features, lateness_s)
        if state is not None:
            history.processed_through_us, all_times, series_times, series_values = state
            history.times = [list(all_times), *(list(t) for t in series_times)]
            history.values = [[], *(list(v) for v in series_values)]
        return history
