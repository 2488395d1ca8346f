"""The engine whose requests cost O(1) in the window's population
(transforms/window_index.py under transforms/point_in_time.py) against the
engine that scanned every window (tests/scan_engine.py, kept verbatim as the
reference): bit for bit, for random streams delivered in random bundles, out
of order, with ties, late events, evictions and state round trips."""

import bisect
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.scan_engine import ScanKeyHistory, _stddev, bits
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, search_from
from transforms.spec import WindowedFeature
from transforms.window_index import ExactSums, SlidingDistinct, SlidingExtreme

MIN = 60_000_000
KEY = ("tailnum",)
FEATURES = (
    WindowedFeature("n_1h", KEY, "count", 3600),
    WindowedFeature("sum_1h", KEY, "sum", 3600, "delay"),
    WindowedFeature("mean_3h", KEY, "mean", 3 * 3600, "delay"),
    WindowedFeature("min_1h", KEY, "min", 3600, "delay"),
    WindowedFeature("max_3h", KEY, "max", 3 * 3600, "delay"),
    WindowedFeature("min_3h", KEY, "min", 3 * 3600, "delay"),
    WindowedFeature("std_2h", KEY, "stddev", 2 * 3600, "delay"),
    WindowedFeature("ratio_2h", KEY, "ratio", 2 * 3600, "delay", "weight"),
    WindowedFeature("last_1h", KEY, "last", 3600, "delay"),
    WindowedFeature("since_3h", KEY, "time_since_last", 3 * 3600),
    WindowedFeature("since_delay_1h", KEY, "time_since_last", 3600, "delay"),
    WindowedFeature("last3_2h", KEY, "last_k", 2 * 3600, "delay", k=3),
    WindowedFeature("dests_1h", KEY, "count_distinct", 3600, "dest"),
    WindowedFeature("delays_3h", KEY, "count_distinct", 3 * 3600, "delay"),
)
FIELDS = ("delay", "dest", "weight")




_finite = st.floats(allow_nan=False, allow_infinity=False)
_delays = st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), st.integers(-500, 500),
                    st.sampled_from([0.0, -0.0, 0.1, 0.2, 0.3, 1e-300, 5e-324, 123456.789, 7.0, 7]))
_times = st.one_of(st.integers(0, 24).map(lambda q: q * 15 * MIN),  # a 15 min grid: ties and window edges
                   st.integers(0, 6 * 60 * MIN))
_events = st.lists(st.tuples(st.booleans(), _times, _delays, st.one_of(st.none(), st.sampled_from("ABC")),
                             st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, -1.0, -0.0]))), max_size=60)


def _pending(events):
    out = []
    for index, (is_request, time_us, delay, dest, weight) in enumerate(events):
        event_id = f"{(index * 7919) % 1000:03d}-{index}"  # unique, in an order unrelated to time
        if is_request:
            out.append(PendingEvent(time_us, REQUEST, event_id, ()))
        else:
            row = {"delay": delay, "dest": dest, "weight": weight}
            values = tuple(row[s[0]] if len(s) == 1 else (None if None in (row[s[0]], row[s[1]])
                                                          else (row[s[0]], row[s[1]]))
                           for s in KeyHistory(FEATURES).series)
            out.append(PendingEvent(time_us, OBSERVATION, event_id, values))
    return out


def _exact_requests(bundles, lateness_s):
    """The requests the engines answer exactly: no later than lateness_s
    behind the latest event applied before them. (Later ones read what the
    history still held: the scan engine evicted at the end of every bundle,
    the new one clips at the horizon; neither is a point-in-time answer.)"""
    exact, latest = set(), None
    for bundle in bundles:
        for event in sorted(bundle, key=PendingEvent.order):
            if event.rank == REQUEST and (latest is None or event.time_us >= latest - lateness_s * 1_000_000):
                exact.add(event.event_id)
            latest = event.time_us if latest is None else max(latest, event.time_us)
    return exact


def _run(engine, bundles, lateness_s, round_trip):
    """Applies bundles one after another, through the state between them
    (streaming) or in one history (a long batch run)."""
    history, results, exact = engine(FEATURES, lateness_s), [], _exact_requests(bundles, lateness_s)
    for bundle in bundles:
        if round_trip:
            history = engine.from_state(FEATURES, history.to_state(), lateness_s)
        answers, late_requests, late_observations = history.apply(bundle)
        results.append(([(p.event_id, bits(a)) for p, a in answers if p.event_id in exact],
                        late_requests, late_observations))
    return results, history.to_state()


@settings(max_examples=150, deadline=None)
@given(events=_events, cuts=st.lists(st.integers(0, 60), max_size=5), lateness_s=st.sampled_from([0, 1800]),
       round_trip=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_equals_the_scan_engine_bit_for_bit(events, cuts, lateness_s, round_trip, seed):
    pending = _pending(events)
    random.Random(seed).shuffle(pending)  # out of order: late events, windows moving backwards
    bounds = [0, *sorted(c for c in cuts if c < len(pending)), len(pending)]
    bundles = [pending[a:b] for a, b in zip(bounds, bounds[1:])]
    assert _run(KeyHistory, bundles, lateness_s, round_trip) == _run(ScanKeyHistory, bundles, lateness_s, round_trip)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_long_busy_key_in_time_order_equals_the_scan_engine(seed):
    """Thousands of events through one history: the sliding indexes slide,
    the slack eviction trims, a few late events land inside windows."""
    rng = random.Random(seed)
    pending, t = [], 0
    for index in range(3000):
        t += rng.choice([0, 0, 10, 60, 300]) * 1_000_000  # ties, bursts and gaps
        late = rng.random() < 0.02
        time_us = max(0, t - rng.randint(0, 3 * 3600) * 1_000_000) if late else t
        if rng.random() < 0.4:
            pending.append(PendingEvent(time_us, REQUEST, f"r{index:05d}", ()))
        else:
            delay = rng.choice([None, rng.randint(-20, 300), rng.uniform(-20, 300), 0.1, -0.0])
            dest, weight = rng.choice([None, "A", "B", "C", "D"]), rng.choice([None, 1.0, 2.5])
            pending.extend(_pending([(False, time_us, delay, dest, weight)]))
            pending[-1] = pending[-1]._replace(event_id=f"o{index:05d}")
    bundles = [pending[i:i + 200] for i in range(0, len(pending), 200)]
    for round_trip in (False, True):
        assert _run(KeyHistory, bundles, 1800, round_trip) == _run(ScanKeyHistory, bundles, 1800, round_trip)


def _fsum(values):
    """math.fsum, or None where it overflows (within the exact sum's double or not: the exact sums may
    then answer, or raise OverflowError as well)."""
    try:
        return math.fsum(values)
    except OverflowError:
        return None


def _slices(values, data):
    lo = data.draw(st.integers(0, len(values)))
    return lo, data.draw(st.integers(lo, len(values)))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_finite, max_size=30), data=st.data())
def test_exact_sums_round_like_fsum_and_stddev_like_the_scan(values, data):
    lo, hi = _slices(values, data)
    sums = ExactSums(list(values), squares=True)
    expected = _fsum(values[lo:hi])
    if expected is not None:
        assert bits(sums.total(lo, hi)) == bits(expected)
    if hi > lo:
        ratios = [v.as_integer_ratio() for v in values]
        assert bits(sums.stddev(lo, hi)) == bits(_stddev(values, [], lo, hi, 0, None, ratios))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(_finite, st.integers(-3, 3), st.just(-0.0)), min_size=1, max_size=40),
       inserts=st.lists(st.tuples(st.integers(0, 40), st.floats(-5, 5)), max_size=5), data=st.data())
def test_sliding_indexes_follow_insertions_drops_and_any_window(values, inserts, data):
    values = list(values)
    minimum, maximum, distinct = SlidingExtreme(values), SlidingExtreme(values, largest=True), SlidingDistinct(values)
    sums = ExactSums(values)
    for _ in range(8):
        action = data.draw(st.sampled_from(["query", "query", "insert", "drop"]))
        if action == "insert" and inserts:
            at, value = inserts.pop()
            at = min(at, len(values))
            values.insert(at, value)
            for index in (minimum, maximum, distinct, sums):
                index.insert(at, value)
        elif action == "drop" and len(values) > 1:
            drop = data.draw(st.integers(1, len(values) - 1))
            del values[:drop]
            for index in (minimum, maximum, distinct, sums):
                index.drop_front(drop)
        lo, hi = _slices(values, data)
        if hi > lo:
            window = values[lo:hi]
            assert bits(minimum.query(lo, hi)) == bits(float(min(window)))
            assert bits(maximum.query(lo, hi)) == bits(float(max(window)))
            assert distinct.query(lo, hi) == float(len(set(window)))
            expected = _fsum(window)
            if expected is not None:
                assert bits(sums.total(lo, hi)) == bits(expected)


@given(times=st.lists(st.integers(0, 50), max_size=40).map(sorted), x=st.integers(-1, 51), guess=st.integers(0, 45),
       data=st.data())
def test_a_search_from_any_guess_is_a_bisection(times, x, guess, data):
    hi = data.draw(st.integers(0, len(times)))
    assert search_from(times, x, guess, hi) == bisect.bisect_left(times, x, 0, hi)
