"""Every feature of one group for every request among a batch of events at
once: numpy over sorted arrays, where `KeyHistory` answers one request at a
time. No Beam in here. The batch path hands it the events of one (group,
shard, time bucket), of any number of key values.

Sorted by (key value, time, rank, event_id), the events are what
`KeyHistory.apply` reads, key after key. Each series (the observations with
a value for it) becomes one array over every key, and a request's window
[t - W, t) of its key is the slice [lo, hi) found by two `searchsorted` over
(key, time) packed into one int64. Then, per aggregate:

- count, last, time_since_last, last_k: read by index;
- sum, mean, ratio: differences of int64 prefix sums when every value of
  the series is a whole multiple of one 2**-e and no prefix can overflow
  (flight delays: whole minutes, e = 0). That is the exact sum, and one
  conversion rounds it as `ExactSums.total` does. Otherwise `ExactSums`
  itself answers, one request at a time;
- stddev: the exact integer numerator, vectorized when it fits in int64,
  then `window_index.exact_stddev` per request (an integer square root);
- min, max: a sparse table of positions, keeping the earlier position on
  ties as `min()` and `max()` of the slice do (0.0 against -0.0);
- count_distinct: `SlidingDistinct` per request.

Every answer equals `KeyHistory`'s bit for bit (tests/test_columnar_windows.py).
Input it cannot pack (time spans beyond int64 with many key values) goes
to `KeyHistory` whole.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, history_layout
from transforms.spec import AGGREGATE_RULES, WindowedFeature
from transforms.window_index import ExactSums, SlidingDistinct, exact_stddev

_US = 1_000_000
_PACKED_LIMIT = 1 << 62  # key code * stride + time: below this, int64 arithmetic cannot overflow
_PREFIX_LIMIT = 1 << 62  # |prefix sums| below this fit int64 with room


def answer_events(features: Sequence[WindowedFeature], events: Sequence[tuple]) -> list[tuple[str, tuple]]:
    """(key value, event_id, rank, time_us, series values) per event, in any
    order -> (event_id, the features' answers in `features` order) per request,
    as `KeyHistory(features).apply` answers each key value's events."""
    if not events:
        return []
    keys, ids, ranks, times, values = zip(*events)
    codes_of: dict = {}
    codes = np.fromiter((codes_of.setdefault(k, len(codes_of)) for k in keys), np.int64, len(keys))
    width = len(history_layout(tuple(features))[0])
    series = [[v[at] if at < len(v) else None for v in values] for at in range(width)]
    return list(zip(*answer_columns(features, codes, list(ids), np.asarray(ranks, np.int8),
                                    np.asarray(times, np.int64), series)))


def answer_columns(features: Sequence[WindowedFeature], codes: np.ndarray, ids: list[str], ranks: np.ndarray,
                   times: np.ndarray, series: Sequence) -> tuple[list[str], list[tuple]]:
    """`answer_events` on columns, one entry per event in each: key codes (any
    int per key value), event_ids, ranks, times, and per series of
    `history_series(features)` its values, as a list (None: missing) or float64
    array (NaN: missing). -> (the requests' event_ids, their answers)."""
    if not len(ids):
        return [], []
    time, rank = times, ranks
    layout_series, windows, longest_s = history_layout(tuple(features))
    longest_us = longest_s * _US
    start = int(time.min())
    stride = int(time.max()) - start + longest_us + 1  # a key's (time + longest) never reaches the next key's
    if (int(codes.max()) + 1) * stride >= _PACKED_LIMIT or int(codes.min()) < 0:
        return _by_key_history(features, codes, ids, ranks, times, series)

    by_id = sorted(range(len(ids)), key=ids.__getitem__)  # Python's order of str, as KeyHistory's
    id_rank = np.empty(len(ids), np.int64)
    id_rank[by_id] = np.arange(len(ids))
    order = np.lexsort((id_rank, rank, time, codes))
    packed = codes * stride + (time - start + longest_us)
    requests = order[rank[order] == REQUEST]
    observations = order[rank[order] == OBSERVATION]
    request_at, request_time = packed[requests], time[requests]

    # Per series position (0: every observation), its observations in order: packed times, times, values.
    columns: list = [None] * (len(layout_series) + 1)
    columns[0] = _Series(packed[observations], time[observations], [()] * len(observations))
    for position, column in enumerate(series, start=1):
        if isinstance(column, np.ndarray):
            observed = column[observations]
            present = ~np.isnan(observed)
            kept = observations[present]
            columns[position] = _Series(packed[kept], time[kept], observed[present].tolist(), observed[present])
        else:
            raw = [column[i] for i in observations.tolist()]
            kept = observations[np.fromiter((v is not None for v in raw), bool, len(raw))]
            columns[position] = _Series(packed[kept], time[kept], [v for v in raw if v is not None])

    answers: list = [None] * len(features)
    for position, window_us, slots in windows:
        column = columns[position]
        hi = np.searchsorted(column.packed, request_at, "left")  # an observation at t is not in the window
        lo = np.searchsorted(column.packed, request_at - window_us, "left")  # one at t - W is
        for slot, aggregate, k, empty in slots:
            try:
                answers[slot] = _AGGREGATES[aggregate](column, lo, hi, request_time, k, empty)
            except _NotADouble:
                return _by_key_history(features, codes, ids, ranks, times, series)
    event_ids = [ids[i] for i in requests.tolist()]
    return event_ids, list(zip(*answers)) if answers else [()] * len(event_ids)


def _by_key_history(features, codes, ids, ranks, times, series) -> tuple[list[str], list[tuple]]:
    lists = [column.tolist() if isinstance(column, np.ndarray) else column for column in series]
    by_key: dict = {}
    for i, (code, event_id, rank, time_us) in enumerate(zip(codes.tolist(), ids, ranks.tolist(), times.tolist())):
        values = () if rank == REQUEST else tuple(None if v != v else v for v in (column[i] for column in lists))
        by_key.setdefault(code, []).append(PendingEvent(time_us, rank, event_id, values))
    event_ids, answers = [], []
    for pending in by_key.values():
        for request, answer in KeyHistory(features).apply(pending)[0]:
            event_ids.append(request.event_id)
            answers.append(answer)
    return event_ids, answers


class _Series:
    """One series over every key value: packed (key, time) and times, sorted; its values as Python objects;
    what the aggregates derive from them, made once and shared by the series' features."""

    def __init__(self, packed: np.ndarray, times: np.ndarray, values: list, floats: Optional[np.ndarray] = None):
        self.packed, self.times, self.values = packed, times, values
        self._derived: dict = {} if floats is None else {"floats": floats}

    def derived(self, name, make):
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    def floats(self) -> np.ndarray:
        """The values as doubles, as `float()` gives them."""
        def make():
            try:
                return np.array([float(v) for v in self.values], dtype=np.float64)
            except OverflowError:
                raise _NotADouble from None  # an int beyond a double
        return self.derived("floats", make)

    def component(self, index: Optional[int]) -> "_Series":
        """The series of one part of its (numerator, denominator) values."""
        if index is None:
            return self
        return self.derived(("component", index),
                            lambda: _Series(self.packed, self.times, [v[index] for v in self.values]))

    def prefix(self, squares: bool = False) -> Optional[tuple[np.ndarray, Optional[np.ndarray], int]]:
        """(prefix sums, prefix sums of squares or None, e): exact int64 sums of the values in units of
        2**-e; None when they do not fit."""
        return self.derived(("prefix", squares), lambda: _int_prefix(self.floats(), squares))

    def exact(self, squares: bool = False) -> ExactSums:
        return self.derived(("exact", squares), lambda: ExactSums(self.values, None, squares))


class _NotADouble(Exception):
    pass


def _int_prefix(values: np.ndarray, squares: bool):
    if not len(values):
        return np.zeros(1, np.int64), (np.zeros(1, np.int64) if squares else None), 0
    mantissa, exponent = np.frexp(values)
    whole = (mantissa * 2.0 ** 53).astype(np.int64)  # exact: the value is whole * 2**(exponent - 53)
    lowest = whole & -whole
    trailing = np.log2(np.where(lowest > 0, lowest, 1)).astype(np.int64)
    needed = np.where(whole != 0, 53 - exponent - trailing, 0)
    e = max(int(needed.max()), 0)
    if e > 62:
        return None
    largest = float(np.abs(values).max()) * 2.0 ** e
    n = len(values)
    if largest * n >= _PREFIX_LIMIT or (squares and (largest * n) ** 2 >= _PREFIX_LIMIT):
        return None
    scaled = np.ldexp(values, e).astype(np.int64)  # whole numbers now, exactly
    prefix = np.zeros(n + 1, np.int64)
    np.cumsum(scaled, out=prefix[1:])
    square_prefix = None
    if squares:
        square_prefix = np.zeros(n + 1, np.int64)
        np.cumsum(scaled * scaled, out=square_prefix[1:])
    return prefix, square_prefix, e


def _fill(values: np.ndarray, has: np.ndarray, empty) -> list:
    """A column as Python objects: the value where the window is not empty, `empty` where it is."""
    out = values.tolist()
    for i in np.flatnonzero(~has).tolist():
        out[i] = empty
    return out


def _totals(column: _Series, lo, hi) -> Optional[np.ndarray]:
    """Each window's sum, correctly rounded; None when the exact int64 sums do not fit."""
    prefix = column.prefix()
    if prefix is None:
        return None
    sums, _, e = prefix
    return np.ldexp((sums[hi] - sums[lo]).astype(np.float64), -e)  # int64 -> double rounds to nearest, even


def _count(column, lo, hi, t, k, empty):
    return (hi - lo).astype(np.float64).tolist()


def _sum(column, lo, hi, t, k, empty):
    totals = _totals(column, lo, hi)
    if totals is None:
        total = column.exact().total
        return [total(a, b) if b > a else empty for a, b in zip(lo.tolist(), hi.tolist())]
    return _fill(totals, hi > lo, empty)


def _mean(column, lo, hi, t, k, empty):
    n = hi - lo
    totals = _totals(column, lo, hi)
    if totals is None:
        total = column.exact().total
        return [total(a, b) / (b - a) if b > a else empty for a, b in zip(lo.tolist(), hi.tolist())]
    return _fill(totals / np.maximum(n, 1), n > 0, empty)


def _ratio(column, lo, hi, t, k, empty):
    numerator, denominator = column.component(0), column.component(1)
    top, bottom = _totals(numerator, lo, hi), _totals(denominator, lo, hi)
    if top is None or bottom is None:
        top_of, bottom_of = numerator.exact().total, denominator.exact().total
        out = []
        for a, b in zip(lo.tolist(), hi.tolist()):
            below = bottom_of(a, b) if b > a else 0
            out.append(top_of(a, b) / below if below else empty)
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        return _fill(top / bottom, (hi > lo) & (bottom != 0), empty)


def _stddev(column, lo, hi, t, k, empty):
    prefix = column.prefix(squares=True)
    if prefix is None:
        stddev = column.exact(squares=True).stddev
        return [stddev(a, b) if b > a else empty for a, b in zip(lo.tolist(), hi.tolist())]
    sums, squares, e = prefix
    n = hi - lo
    total = sums[hi] - sums[lo]
    numerators = n * (squares[hi] - squares[lo]) - total * total  # fits: checked against the prefix's bound
    out = [empty] * len(n)
    for i, numerator, count in zip(np.flatnonzero(n > 0).tolist(), numerators[n > 0].tolist(), n[n > 0].tolist()):
        out[i] = exact_stddev(numerator, count, e)
    return out


def _extreme(largest: bool):
    better = np.greater if largest else np.less

    def aggregate(column, lo, hi, t, k, empty):
        values = column.floats()
        has = hi > lo
        out_values = np.zeros(len(lo))
        if has.any():
            table = column.derived(("extreme", largest), lambda: _SparseTable(values, better))
            out_values[has] = values[table.query(lo[has], hi[has])]
        return _fill(out_values, has, empty)
    return aggregate


class _SparseTable:
    """Positions of the first extreme of every power-of-two span of `values`:
    any window's in two reads (its two overlapping power-of-two halves), the
    earlier position kept on ties."""

    def __init__(self, values: np.ndarray, better):
        self._values, self._better = values, better
        self.levels = [np.arange(len(values))]
        span = 1
        while 2 * span <= len(values):
            previous = self.levels[-1]
            left, right = previous[:len(previous) - span], previous[span:]
            self.levels.append(np.where(better(values[right], values[left]), right, left))
            span *= 2

    def query(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        level = np.log2(hi - lo).astype(np.int64)  # exact on integers below 2**53
        out = np.empty(len(lo), np.int64)
        for j in np.unique(level).tolist():
            at = level == j
            positions = self.levels[j]
            left, right = positions[lo[at]], positions[hi[at] - (1 << j)]
            out[at] = np.where(self._better(self._values[right], self._values[left]), right, left)
        return out


def _last(column, lo, hi, t, k, empty):
    values = column.floats()
    has = hi > lo
    return _fill(values[np.where(has, hi - 1, 0)] if len(values) else np.zeros(len(lo)), has, empty)


def _time_since_last(column, lo, hi, t, k, empty):
    has = hi > lo
    if not len(column.times):
        return [empty] * len(lo)
    latest = column.times[np.where(has, hi - 1, 0)]
    return _fill((t - latest).astype(np.float64) / _US, has, empty)  # exact difference, one rounding


def _last_k(column, lo, hi, t, k, empty):
    values = column.derived("float list", lambda: [float(v) for v in column.values])
    return [tuple(values[max(a, b - k):b][::-1]) if b > a else empty for a, b in zip(lo.tolist(), hi.tolist())]


def _count_distinct(column, lo, hi, t, k, empty):
    distinct = SlidingDistinct(column.values)  # a window that moves forward costs the change of its ends
    return [distinct.query(a, b) if b > a else empty for a, b in zip(lo.tolist(), hi.tolist())]


_AGGREGATES = {
    "count": _count,
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
assert set(_AGGREGATES) == set(AGGREGATE_RULES)  # every aggregate of the spec, in both engines
