"""The engine as it was before windows cost O(1) per request: every aggregate
scans its window's slice (`math.fsum` over the values in [t - W, t), `min`
over them, a set of them). Kept verbatim (its exact square root too, rather than
imported: a reference shares no code with what it checks) as the reference
the new engine must equal bit for bit (tests/test_window_engine.py) and the
"old" curve of bench/engine_bench.py. Not used by the product.
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Callable, Iterable, Optional, Sequence

from transforms.point_in_time import OBSERVATION, REQUEST, PendingEvent, empty_value, history_series  # noqa: F401
from transforms.spec import AGGREGATE_RULES, WindowedFeature

_US = 1_000_000


def bits(value):
    """Floats by their bits (0.0 and -0.0 differ), in any nesting: how the engines' answers are compared."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, tuple):
        return tuple(bits(v) for v in value)
    return value


# An aggregate: (values, times, lo, hi, t_us, k, ratios) -> its value over the
# non-empty window [lo, hi) of a series (values and times sorted by (time,
# event_id)); ratios: each value's float.as_integer_ratio(), kept beside the
# values for the aggregates that need exact arithmetic (`EXACT`), else None.
Aggregate = Callable[[list, list, int, int, int, Optional[int], Optional[list]], object]
EXACT = frozenset({"stddev"})


def _stddev(values: list, times: list, lo: int, hi: int, t_us: int, k: Optional[int], ratios: list) -> float:
    """Population standard deviation, exactly rounded: every value is an
    integer multiple of 2**-e for the window's largest e (0 for whole
    numbers), so the sums are exact integers and the square root is taken in
    integers (no intermediate double to underflow or overflow): bit for bit
    the same whatever the order of the values."""
    numerators, denominators = zip(*ratios[lo:hi])
    bits = max(denominators).bit_length() - 1  # the largest e: denominators are powers of 2
    scaled = numerators if not bits else [
        numerator << (bits - denominator.bit_length() + 1) for numerator, denominator in zip(numerators, denominators)]
    n = hi - lo
    total = sum(scaled)
    numerator = n * sum(map(operator.mul, scaled, scaled)) - total * total  # n^2 var, in units of 2**-2e
    return _exact_sqrt_ratio(numerator, n, bits) if numerator else 0.0


def _exact_sqrt_ratio(numerator: int, n: int, bits: int) -> float:
    """sqrt(numerator) / (n * 2**bits), correctly rounded to a double."""
    shift = max(0, 66 - numerator.bit_length() // 2 + n.bit_length())  # 66+ bits of the root before rounding
    scaled, remainder = divmod(numerator << (2 * shift), n * n)
    root = math.isqrt(scaled)  # floor(sqrt(numerator * 4**shift / n**2)), exactly
    if remainder or root * root != scaled:  # inexact: a sticky bit so that one rounding is the right one
        return (2 * root + 1) / (1 << (shift + bits + 1))
    return root / (1 << (shift + bits))


def _ratio(values: list, times: list, lo: int, hi: int, t_us: int, k: Optional[int], ratios) -> Optional[float]:
    pairs = values[lo:hi]
    denominator = math.fsum(pair[1] for pair in pairs)
    return math.fsum(pair[0] for pair in pairs) / denominator if denominator else None  # nothing to divide: missing


SCAN_FUNCTIONS: dict[str, Aggregate] = {
    "count": lambda values, times, lo, hi, t_us, k, ratios: float(hi - lo),
    "sum": lambda values, times, lo, hi, t_us, k, ratios: math.fsum(values[lo:hi]),
    "mean": lambda values, times, lo, hi, t_us, k, ratios: math.fsum(values[lo:hi]) / (hi - lo),
    "min": lambda values, times, lo, hi, t_us, k, ratios: float(min(values[lo:hi])),
    "max": lambda values, times, lo, hi, t_us, k, ratios: float(max(values[lo:hi])),
    "ratio": _ratio,
    "stddev": _stddev,
    # The series is sorted by (time, event_id): its last element is the latest
    # observation, ties on time going to the larger event_id.
    "last": lambda values, times, lo, hi, t_us, k, ratios: float(values[hi - 1]),
    "time_since_last": lambda values, times, lo, hi, t_us, k, ratios: (t_us - times[hi - 1]) / _US,
    "last_k": lambda values, times, lo, hi, t_us, k, ratios: tuple(float(v) for v in values[max(lo, hi - k):hi][::-1]),
    "count_distinct": lambda values, times, lo, hi, t_us, k, ratios: float(len(set(values[lo:hi]))),
}
assert set(SCAN_FUNCTIONS) == set(AGGREGATE_RULES)


class ScanKeyHistory:
    """Observations of one key, per series, sorted by (time, event_id); answers requests.

    `times[0]` holds every observation's time (for count); `times[i + 1]`,
    `values[i + 1]` and `ids[i + 1]` hold the observations in `series[i]`.
    Lists indexed by position, not dicts keyed by series: a tuple key is
    hashed at every lookup, and lookups run for every feature of every request.
    """

    def __init__(self, features: Sequence[WindowedFeature], lateness_s: int = 0):
        self.features = tuple(features)
        self.series = history_series(features)
        # Per feature, what features_at needs, resolved once: it runs for every request.
        position = {series: index + 1 for index, series in enumerate(self.series)}
        self._plan = tuple((position.get(f.inputs, 0), f.window_s * _US, SCAN_FUNCTIONS[f.aggregate],
                            empty_value(f.aggregate), f.k) for f in self.features)
        self._exact = frozenset(position[f.inputs] for f in self.features if f.aggregate in EXACT)
        # Kept: the longest window, plus how far behind a request may still arrive
        # and be answered exactly.
        self.horizon_us = (max(f.window_s for f in features) + lateness_s) * _US
        self.times: list[list[int]] = [[] for _ in range(len(self.series) + 1)]
        self.values: list[list] = [[] for _ in range(len(self.series) + 1)]  # [0] stays empty
        self.ids: list[list[str]] = [[] for _ in range(len(self.series) + 1)]  # [0] stays empty
        # Exact ratios of the values of the series an EXACT aggregate reads (None for the others):
        # derived, so not in the state.
        self.ratios: list[Optional[list]] = [[] if i in self._exact else None for i in range(len(self.series) + 1)]
        self.processed_through_us: Optional[int] = None  # time of the latest event applied

    def add_observation(self, time_us: int, values: tuple, event_id: str = "") -> None:
        bisect.insort(self.times[0], time_us)
        for index, value in enumerate(values, start=1):
            if value is not None:
                times, ids = self.times[index], self.ids[index]
                at = bisect.bisect_right(times, time_us)
                while at and times[at - 1] == time_us and ids[at - 1] > event_id:  # ties: by event_id
                    at -= 1
                times.insert(at, time_us)
                ids.insert(at, event_id)
                self.values[index].insert(at, value)
                if index in self._exact:
                    self.ratios[index].insert(at, float(value).as_integer_ratio())

    def features_at(self, t_us: int) -> tuple:
        """Every feature of the group for a request at t, in `features` order."""
        out = []
        for index, window_us, function, empty, k in self._plan:
            times = self.times[index]
            lo = bisect.bisect_left(times, t_us - window_us)
            hi = bisect.bisect_left(times, t_us)
            out.append(function(self.values[index], times, lo, hi, t_us, k, self.ratios[index]) if hi > lo else empty)
        return tuple(out)

    def evict_before(self, time_us: int) -> None:
        """Forget observations older than any window of a request at or after time_us can reach."""
        cutoff = time_us - self.horizon_us
        for times, values, ids, ratios in zip(self.times, self.values, self.ids, self.ratios):
            drop = bisect.bisect_left(times, cutoff)
            if drop:
                del times[:drop]
                del values[:drop]  # a no-op on values[0], always empty
                del ids[:drop]
                if ratios is not None:
                    del ratios[:drop]

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
                self.add_observation(event.time_us, event.values, event.event_id)
        if self.processed_through_us is not None:
            self.evict_before(self.processed_through_us)
        return answers, late_requests, late_observations

    # State round trip: plain lists and ints, so Beam's fast coders carry it.
    def to_state(self) -> tuple:
        return (self.processed_through_us, self.times[0], tuple(self.times[1:]), tuple(self.values[1:]),
                tuple(self.ids[1:]))

    @classmethod
    def from_state(cls, features: Sequence[WindowedFeature], state: Optional[tuple],
                   lateness_s: int = 0) -> "ScanKeyHistory":
        history = cls(features, lateness_s)
        if state is not None:
            history.processed_through_us, all_times, series_times, series_values, series_ids = state
            history.times = [list(all_times), *(list(t) for t in series_times)]
            history.values = [[], *(list(v) for v in series_values)]
            history.ids = [[], *(list(i) for i in series_ids)]
            history.ratios = [[float(v).as_integer_ratio() for v in values] if i in history._exact else None
                              for i, values in enumerate(history.values)]
        return history
