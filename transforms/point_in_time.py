"""The point-in-time arithmetic, with no Beam in it.

For a request at time t, `AGG(field) over W` reads the observations of the
same entity key whose time lies in [t - W, t): an observation exactly at
t - W counts, one exactly at t does not. Empty window: count and
count_distinct are 0, last_k is (), every other aggregate is None (missing).

`KeyHistory` holds one key's observations for one group of windowed features
(those sharing a kind and a key) and answers requests in time order. It
keeps only what a future window can reach, so its size is bounded by the
longest window, not by the key's whole history. Every aggregate depends only
on the set of observations in the window, never on the order they were
added (sums are exact, ties on time are broken by event_id), so batch and
streaming give bit-identical values.

An aggregate reads a *series*: the observations where its input fields are
all present, with their values (one value, or a (numerator, denominator)
pair for a ratio), sorted by (time, event_id). Features reading the same
fields share a series. No aggregate scans its window: sums come from exact
integer prefix sums, min/max and distinct counts from sliding indexes
(transforms/window_index.py), the rest read O(k) entries, so a request costs
the same with a thousand observations in its window or a million
(bench/engine_bench.py). The engine that scanned (tests/scan_engine.py) is
the reference they equal bit for bit. A new aggregate is one function in
`AGGREGATE_FUNCTIONS`, its columnar twin in transforms/columnar_windows.py
(the batch path's), and its rule in transforms/spec.py.
"""

from __future__ import annotations

import bisect
import functools
import operator
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

from transforms.spec import AGGREGATE_RULES, WindowedFeature
from transforms.window_index import ExactSums, SlidingDistinct, SlidingExtreme

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


class SeriesView:
    """What an aggregate may read of its series (times and values, sorted by
    (time, event_id)) and the indexes (transforms/window_index.py) it may ask
    for; the history keeps them in step with every insertion and eviction."""

    def __init__(self, times: list, values: list, indexes: list):
        self.times, self.values, self._indexes = times, values, indexes
        self._sums: dict[tuple, ExactSums] = {}

    def _index(self, index):
        self._indexes.append(index)
        return index

    def sums(self, component: Optional[int] = None, squares: bool = False) -> ExactSums:
        """Exact prefix sums of the values (or of component i of tuple values), shared by the series' features."""
        if (component, squares) not in self._sums:
            self._sums[component, squares] = self._index(ExactSums(self.values, component, squares))
        return self._sums[component, squares]

    def extreme(self, largest: bool) -> SlidingExtreme:
        return self._index(SlidingExtreme(self.values, largest))  # one per feature: it follows that feature's window

    def distinct(self) -> SlidingDistinct:
        return self._index(SlidingDistinct(self.values))


_ORDER = operator.itemgetter(0, 1, 2)  # PendingEvent.order, without a Python call per event


# An aggregate: (its series, k) -> a function (lo, hi, t_us) -> its value over
# the non-empty window [lo, hi) of the series, for a request at t_us. None of
# them scans the window: the cost of a request does not grow with the
# window's population (bench/engine_bench.py); every one equals the scan of
# the window's slice (tests/scan_engine.py) bit for bit.
Aggregate = Callable[[SeriesView, Optional[int]], Callable[[int, int, int], object]]


def _sum(series: SeriesView, k):
    total = series.sums().total
    return lambda lo, hi, t_us: total(lo, hi)


def _mean(series: SeriesView, k):
    total = series.sums().total
    return lambda lo, hi, t_us: total(lo, hi) / (hi - lo)  # the rounded sum divided: what fsum(slice) / n gives


def _ratio(series: SeriesView, k):
    numerator, denominator = series.sums(0).total, series.sums(1).total

    def ratio(lo, hi, t_us):
        total = denominator(lo, hi)
        return numerator(lo, hi) / total if total else None  # nothing to divide: missing
    return ratio


def _stddev(series: SeriesView, k):
    """Population standard deviation, exactly rounded: from exact sums of
    the values and of their squares, the square root taken in integers (no
    intermediate double to underflow or overflow)."""
    return lambda lo, hi, t_us, stddev=series.sums(squares=True).stddev: stddev(lo, hi)


def _extreme(largest: bool) -> Aggregate:
    def aggregate(series: SeriesView, k):
        query = series.extreme(largest).query
        return lambda lo, hi, t_us: query(lo, hi)
    return aggregate


def _count_distinct(series: SeriesView, k):
    query = series.distinct().query
    return lambda lo, hi, t_us: query(lo, hi)


def _last(series: SeriesView, k):
    # The series is sorted by (time, event_id): its last element is the latest
    # observation, ties on time going to the larger event_id.
    values = series.values
    return lambda lo, hi, t_us: float(values[hi - 1])


def _time_since_last(series: SeriesView, k):
    times = series.times
    return lambda lo, hi, t_us: (t_us - times[hi - 1]) / _US


def _last_k(series: SeriesView, k):
    values = series.values
    return lambda lo, hi, t_us: tuple(float(v) for v in values[max(lo, hi - k):hi][::-1])


AGGREGATE_FUNCTIONS: dict[str, Aggregate] = {
    "count": lambda series, k: lambda lo, hi, t_us: float(hi - lo),
    "sum": _sum,
    "mean": _mean,
    "min": _extreme(largest=False),
    "max": _extreme(largest=True),
    "ratio": _ratio,
    "stddev": _stddev,
    "last": _last,
    "time_since_last": _time_since_last,
    "last_k": _last_k,
    "count_distinct": _count_distinct,
}
assert set(AGGREGATE_FUNCTIONS) == set(AGGREGATE_RULES)


def empty_value(function: str):
    """An aggregate's value on an empty window."""
    rule = AGGREGATE_RULES[function]
    return 0.0 if rule.integer else () if rule.sequence else None


def aggregate(function: str, values: Sequence, times: Optional[Sequence[int]] = None, t_us: int = 0,
              k: Optional[int] = None):
    """One aggregate over the observations of a window, already free of
    missing values and sorted by (time, event_id); for a ratio,
    (numerator, denominator) pairs. Times are needed by time_since_last only."""
    if function not in AGGREGATE_FUNCTIONS:
        raise ValueError(f"unknown aggregate {function!r}")
    if not values:
        return empty_value(function)
    times = list(times) if times is not None else [0] * len(values)
    series = SeriesView(times, list(values), [])
    return AGGREGATE_FUNCTIONS[function](series, k)(0, len(values), t_us)


def history_series(features: Sequence[WindowedFeature]) -> tuple[tuple[str, ...], ...]:
    """The series a group of features reads (each a tuple of observation
    fields), in a fixed order; counts (and time_since_last of any
    observation) read every observation, `()`."""
    return tuple(sorted({f.inputs for f in features if f.inputs}))


def series_value(values: tuple, index: tuple[int, ...]) -> object:
    """An observation's value in a series, from its values at `index`: the one
    field, or the tuple of them; None (not in the series) when any is missing."""
    if len(index) == 1:
        return values[index[0]]
    parts = tuple(values[i] for i in index)
    return None if None in parts else parts


@functools.lru_cache(maxsize=None)
def history_layout(features: tuple[WindowedFeature, ...]) -> tuple:
    """What a history of these features needs that does not depend on its
    observations, worked out once per group (a batch job makes a history per
    key value and time bucket): the series, and per (series, window) the
    features reading it, which share the two bisections finding the window:
    (series, ((series position, window_us, ((slot, aggregate, k, empty), ...)), ...), longest window)."""
    series = history_series(features)
    position = {inputs: index + 1 for index, inputs in enumerate(series)}
    windows: dict[tuple[int, int], list] = {}
    for slot, f in enumerate(features):
        windows.setdefault((position.get(f.inputs, 0), f.window_s * _US), []).append(
            (slot, f.aggregate, f.k, empty_value(f.aggregate)))
    return (series, tuple((index, window_us, tuple(answers)) for (index, window_us), answers in windows.items()),
            max(f.window_s for f in features))


def search_from(times: list, x: int, guess: int, hi: int) -> int:
    """bisect_left(times, x, 0, hi), from a guess: O(log distance) from it,
    and a few neighbouring reads when requests come in time order (a search
    from the middle of a million times misses the cache at every step)."""
    if guess > hi or (guess and times[guess - 1] >= x):
        return bisect.bisect_left(times, x, 0, min(guess, hi))
    lo, step = guess, 1  # every time before lo is < x
    while lo + step <= hi and times[lo + step - 1] < x:
        lo += step
        step <<= 1
    return bisect.bisect_left(times, x, lo, min(lo + step - 1, hi))


class KeyHistory:
    """Observations of one key, per series, sorted by (time, event_id); answers requests.

    `times[0]` holds every observation's time (for count); `times[i + 1]`,
    `values[i + 1]` and `ids[i + 1]` hold the observations in `series[i]`,
    and `indexes[i + 1]` the window indexes its features asked for.
    Lists indexed by position, not dicts keyed by series: a tuple key is
    hashed at every lookup, and lookups run for every feature of every request.
    Every list is changed in place: the indexes and the plan hold them.
    """

    def __init__(self, features: Sequence[WindowedFeature], lateness_s: int = 0):
        self.features = tuple(features)
        self.series, windows, longest_s = history_layout(self.features)
        self.times: list[list[int]] = [[] for _ in range(len(self.series) + 1)]
        self.values: list[list] = [[] for _ in range(len(self.series) + 1)]  # [0] stays empty
        self.ids: list[list[str]] = [[] for _ in range(len(self.series) + 1)]  # [0] stays empty
        self.indexes: list[list] = [[] for _ in range(len(self.series) + 1)]  # derived, so not in the state
        views = [SeriesView(times, values, indexes) for times, values, indexes in zip(self.times, self.values,
                                                                                     self.indexes)]
        self._plan = tuple((self.times[index], window_us, tuple(
            (slot, AGGREGATE_FUNCTIONS[aggregate](views[index], k), empty) for slot, aggregate, k, empty in answers))
            for index, window_us, answers in windows)
        self._starts = [0] * len(self._plan)  # where each window started last: a guess, checked at every use
        # Kept: the longest window, plus how far behind a request may still arrive
        # and be answered exactly.
        self.horizon_us = (longest_s + lateness_s) * _US
        self.processed_through_us: Optional[int] = None  # time of the latest event applied

    def add_observation(self, time_us: int, values: tuple, event_id: str = "") -> None:
        all_times = self.times[0]
        if not all_times or all_times[-1] <= time_us:  # in time order: the end
            all_times.append(time_us)
        else:
            bisect.insort(all_times, time_us)
        for index, value in enumerate(values, start=1):
            if value is not None:
                times, ids = self.times[index], self.ids[index]
                at = len(times) if not times or times[-1] < time_us else bisect.bisect_right(times, time_us)
                while at and times[at - 1] == time_us and ids[at - 1] > event_id:  # ties: by event_id
                    at -= 1
                times.insert(at, time_us)
                ids.insert(at, event_id)
                self.values[index].insert(at, value)
                for window_index in self.indexes[index]:
                    window_index.insert(at, value)

    def features_at(self, t_us: int) -> tuple:
        """Every feature of the group for a request at t, in `features` order."""
        out = [None] * len(self.features)
        # What the history is sure to hold: a request later than lateness_s sees no older
        # observation, whether or not it has been evicted yet (a no-op for every other request).
        floor = -1 << 62 if self.processed_through_us is None else self.processed_through_us - self.horizon_us
        starts = self._starts
        for plan, (times, window_us, answers) in enumerate(self._plan):
            # A request in time order comes after every observation: no search for the window's end;
            # and its window starts near where the previous one did.
            hi = len(times) if not times or times[-1] < t_us else bisect.bisect_left(times, t_us)
            lo = starts[plan] = search_from(times, max(t_us - window_us, floor), starts[plan], hi)
            if hi > lo:
                for slot, answer, _ in answers:
                    out[slot] = answer(lo, hi, t_us)
            else:
                for slot, _, empty in answers:
                    out[slot] = empty
        return tuple(out)

    def evict_before(self, time_us: int) -> None:
        """Forget observations older than any window of a request at or after time_us can reach."""
        cutoff = time_us - self.horizon_us
        for times, values, ids, indexes in zip(self.times, self.values, self.ids, self.indexes):
            drop = bisect.bisect_left(times, cutoff)
            if drop:
                del times[:drop]
                del values[:drop]  # a no-op on values[0], always empty
                del ids[:drop]
                for window_index in indexes:
                    window_index.drop_front(drop)

    def apply(self, events: Iterable[PendingEvent]) -> tuple[list[tuple[PendingEvent, tuple]], int, int]:
        """Applies events in processing order (`PendingEvent.order`).

        Returns each request with its features, and how many requests and
        observations were late: older than an event this key had already
        applied. Late observations still join the history (they count for
        later requests). A late request is answered from the history, exactly
        if it is no later than `lateness_s`; beyond that, from the
        observations since the horizon before the latest event applied
        (`horizon_us`: the longest window plus lateness_s), whenever the
        older ones are evicted.
        """
        answers: list[tuple[PendingEvent, tuple]] = []
        late_requests = late_observations = 0
        for event in sorted(events, key=_ORDER):
            if self.processed_through_us is not None and event.time_us < self.processed_through_us:
                if event.rank == REQUEST:
                    late_requests += 1
                else:
                    late_observations += 1
            else:
                self.processed_through_us = event.time_us
            if event.rank == REQUEST:
                answers.append((event, self.features_at(event.time_us)))
                self._trim()
            else:
                self.add_observation(event.time_us, event.values, event.event_id)
        self._trim()
        return answers, late_requests, late_observations

    def _trim(self) -> None:
        """Memory stays bounded in a long run (by 4/3 of what the horizon holds);
        but a drop moves every entry kept, so the history is trimmed only once a
        quarter of it can go: else each request would cost O(window) again."""
        oldest = self.times[0]
        if oldest and oldest[len(oldest) >> 2] < self.processed_through_us - self.horizon_us:
            self.evict_before(self.processed_through_us)

    # State round trip: plain lists and ints, so Beam's fast coders carry it; only
    # what a future window can reach.
    def to_state(self) -> tuple:
        if self.processed_through_us is not None:
            self.evict_before(self.processed_through_us)
        return (self.processed_through_us, self.times[0], tuple(self.times[1:]), tuple(self.values[1:]),
                tuple(self.ids[1:]))

    @classmethod
    def from_state(cls, features: Sequence[WindowedFeature], state: Optional[tuple],
                   lateness_s: int = 0) -> "KeyHistory":
        history = cls(features, lateness_s)
        if state is not None:
            history.processed_through_us, all_times, series_times, series_values, series_ids = state
            history.times[0][:] = all_times
            for index, (times, values, ids) in enumerate(zip(series_times, series_values, series_ids), start=1):
                history.times[index][:], history.values[index][:], history.ids[index][:] = times, values, ids
            for indexes in history.indexes:
                for window_index in indexes:
                    window_index.rebuild()
        return history
