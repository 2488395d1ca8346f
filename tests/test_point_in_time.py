"""The point-in-time arithmetic against values computed by hand, and against a
brute-force scan of the window for random histories (hypothesis)."""

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.scan_engine import bits
from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, aggregate, series_value
from transforms.spec import WindowedFeature

H = 3_600_000_000
MIN = 60_000_000
ORIGIN = ("origin",)
COUNT_1H = WindowedFeature("n_1h", ORIGIN, "count", 3600)
MEAN_1H = WindowedFeature("mean_1h", ORIGIN, "mean", 3600, "dep_delay")
MAX_1H = WindowedFeature("max_1h", ORIGIN, "max", 3600, "dep_delay")
MIN_1H = WindowedFeature("min_1h", ORIGIN, "min", 3600, "dep_delay")
SUM_3H = WindowedFeature("sum_3h", ORIGIN, "sum", 3 * 3600, "dep_delay")
FEATURES = (COUNT_1H, MEAN_1H, MAX_1H, MIN_1H, SUM_3H)


def obs(time_us, delay, event_id="o"):
    return PendingEvent(time_us, OBSERVATION, event_id, (delay,))


def req(time_us, event_id="r"):
    return PendingEvent(time_us, REQUEST, event_id, ())


def answers(events, features=FEATURES):
    result, _, _ = KeyHistory(features).apply(events)
    return {pending.event_id: values for pending, values in result}


def test_aggregates_by_hand():
    assert aggregate("count", [3.0, 5.0]) == 2.0
    assert aggregate("sum", [3.0, 5.0, -1.0]) == 7.0
    assert aggregate("mean", [3.0, 5.0, -1.0]) == pytest.approx(7 / 3)
    assert aggregate("min", [3.0, 5.0, -1.0]) == -1.0
    assert aggregate("max", [3.0, 5.0, -1.0]) == 5.0
    assert aggregate("count", []) == 0.0
    for function in ("sum", "mean", "min", "max"):
        assert aggregate(function, []) is None


def test_window_edges_start_counts_end_does_not():
    t = 10 * H
    out = answers([obs(t - H, 10.0, "at_start"), obs(t - H - 1, 1000.0, "just_before"),
                   obs(t, 500.0, "at_t"), obs(t - 1, 20.0, "just_inside"), req(t)])
    # 1 h window [t - 1h, t): 10 (exactly t - W counts) and 20; not 1000 (before) nor 500 (at t).
    assert out["r"][:4] == (2.0, 15.0, 20.0, 10.0)
    # 3 h window also has the 1000 just before t - 1h; still not the one at t.
    assert out["r"][4] == 1030.0


def test_empty_window_count_zero_others_missing():
    out = answers([obs(0, 7.0), req(5 * H)])
    assert out["r"] == (0.0, None, None, None, None)


def test_requests_at_equal_times_see_same_state_and_order_does_not_matter():
    t = 2 * H
    events = [obs(t - 30 * 60_000_000, 4.0, "a"), req(t, "r1"), obs(t, 9.0, "b"), req(t, "r2"),
              obs(t - 10 * 60_000_000, 8.0, "c")]
    forward = answers(events)
    backward = answers(list(reversed(events)))
    assert forward == backward
    assert forward["r1"] == forward["r2"] == (2.0, 6.0, 8.0, 4.0, 12.0)


def test_mean_is_exact_whatever_the_order():
    values = [0.1, 1e16, -1e16, 0.3, 0.6]
    events = [obs(i, v, f"o{i}") for i, v in enumerate(values)] + [req(H // 2)]
    out = answers(events, (MEAN_1H,))
    assert out["r"][0] == math.fsum(values) / len(values)


def test_missing_values_are_skipped_but_counted_as_observations():
    out = answers([obs(1, None), obs(2, 6.0), req(3)])
    assert out["r"][:4] == (2.0, 6.0, 6.0, 6.0)


def test_history_is_bounded_by_the_longest_window():
    history = KeyHistory(FEATURES)
    step = 60_000_000  # an observation and a request every minute for 30 days
    for minute in range(30 * 24 * 60):
        history.apply([obs(minute * step, 1.0, f"o{minute}"), req(minute * step + 1, f"r{minute}")])
        assert len(history.times[0]) <= (3 * 60 + 1) * 4 // 3 + 1  # trimmed once a quarter can go
    assert len(history.to_state()[1]) <= 3 * 60 + 1  # the state: only what a future window can reach


def test_late_observation_is_counted_and_joins_the_history():
    history = KeyHistory(FEATURES)
    history.apply([obs(0, 1.0), req(H // 2, "r1")])
    result, late_requests, late_observations = history.apply([obs(H // 4, 3.0, "late"), req(H, "r2")])
    assert (late_requests, late_observations) == (0, 1)
    assert result[0][1][:2] == (2.0, 2.0)  # the late one counts for later requests


def test_state_round_trip_keeps_answers():
    first = KeyHistory(FEATURES)
    first.apply([obs(0, 1.0), obs(10, 5.0), req(20, "r1")])
    restored = KeyHistory.from_state(FEATURES, first.to_state())
    assert restored.apply([req(30)])[0][0][1] == (2.0, 3.0, 5.0, 1.0, 6.0)


FARE_PER_MILE_1H = WindowedFeature("fare_per_mile_1h", ("area",), "ratio", 3600, "fare", "miles")


def test_ratio_is_the_ratio_of_sums_over_observations_with_both_fields():
    assert aggregate("ratio", [(10.0, 2.0), (20.0, 3.0)]) == 6.0  # 30 / 5, not the mean of 5 and 6.67
    assert aggregate("ratio", []) is None
    assert aggregate("ratio", [(4.0, 0.0)]) is None  # nothing to divide by: missing, not inf
    features = (COUNT_1H, FARE_PER_MILE_1H)
    history = KeyHistory(features)
    assert history.series == (("fare", "miles"),)
    # A trip without miles counts as an observation but stays out of the ratio.
    events = [PendingEvent(0, OBSERVATION, "a", ((10.0, 2.0),)), PendingEvent(1, OBSERVATION, "b", (None,)),
              PendingEvent(2, OBSERVATION, "c", ((20.0, 3.0),)), req(3, "r"), req(H + 1, "later")]
    out = {p.event_id: values for p, values in history.apply(events)[0]}
    assert out == {"r": (3.0, 6.0), "later": (2.0, 20.0 / 3.0)}  # a, at 0, is out of [1, H + 1)
    restored = KeyHistory.from_state(features, history.to_state())
    assert restored.features_at(3) == history.features_at(3)


def test_features_reading_the_same_fields_share_a_series():
    ratio_3h = WindowedFeature("fare_per_mile_3h", ("area",), "ratio", 3 * 3600, "fare", "miles")
    fare_mean = WindowedFeature("fare_mean_1h", ("area",), "mean", 3600, "fare")
    assert KeyHistory((FARE_PER_MILE_1H, ratio_3h, fare_mean, COUNT_1H)).series == (("fare",), ("fare", "miles"))


def test_state_is_plain_tuples_of_lists_per_series():
    """(processed through, every observation's time, then per series: times, values, event ids)."""
    history = KeyHistory((COUNT_1H, MEAN_1H, FARE_PER_MILE_1H))
    assert history.series == (("dep_delay",), ("fare", "miles"))
    history.apply([PendingEvent(20, OBSERVATION, "b", (5.0, None)),
                   PendingEvent(10, OBSERVATION, "a", (1.0, (4.0, 2.0))),
                   PendingEvent(20, OBSERVATION, "a", (None, (6.0, 3.0))), req(30)])
    assert history.to_state() == (30, [10, 20, 20], ([10, 20], [10, 20]), ([1.0, 5.0], [(4.0, 2.0), (6.0, 3.0)]),
                                  (["a", "b"], ["a", "a"]))
    restored = KeyHistory.from_state((COUNT_1H, MEAN_1H, FARE_PER_MILE_1H), history.to_state())
    assert restored.features_at(31) == history.features_at(31) == (3.0, 3.0, 10.0 / 5.0)


# ---- the aggregates added with engine v2: stddev, last, time_since_last, last_k, count_distinct ----

TAIL = ("tailnum",)
LAST_1H = WindowedFeature("last_1h", TAIL, "last", 3600, "dep_delay")
SINCE_ANY_1H = WindowedFeature("since_any_1h", TAIL, "time_since_last", 3600)  # of any observation
SINCE_DELAY_1H = WindowedFeature("since_delay_1h", TAIL, "time_since_last", 3600, "dep_delay")
LAST3_1H = WindowedFeature("last3_1h", TAIL, "last_k", 3600, "dep_delay", k=3)
DESTS_1H = WindowedFeature("dests_1h", TAIL, "count_distinct", 3600, "dest")
STD_1H = WindowedFeature("std_1h", TAIL, "stddev", 3600, "dep_delay")
NEW = (LAST_1H, SINCE_ANY_1H, SINCE_DELAY_1H, LAST3_1H, DESTS_1H, STD_1H)


def test_new_aggregates_by_hand():
    # population stddev: mean 5, squared deviations 9+1+1+1+0+0+4+16 = 32, / 8 = 4, sqrt 2
    assert aggregate("stddev", [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == 2.0
    assert aggregate("stddev", [-3.5]) == 0.0  # one value: no spread
    assert aggregate("stddev", [7.25, 7.25, 7.25]) == 0.0  # exactly 0, not a rounding residue
    assert aggregate("stddev", [1.0, 2.0, 4.0, 3.0]) == math.sqrt(1.25)  # mean 2.5; (2.25+.25+2.25+.25) / 4
    # values come sorted by (time, event_id): last is the final one, last_k the final k newest first
    assert aggregate("last", [3.0, -1.0, 8.5]) == 8.5
    assert aggregate("last_k", [1.0, 2.0, 3.0, 4.0], k=3) == (4.0, 3.0, 2.0)
    assert aggregate("last_k", [1.0, 2.0], k=3) == (2.0, 1.0)  # fewer than k: all of them
    assert aggregate("last_k", [5], k=1) == (5.0,) and isinstance(aggregate("last_k", [5], k=1)[0], float)
    # seconds from the latest observation to t: t = 100 s, latest at 40 s
    assert aggregate("time_since_last", [1.0, 2.0], times=[10 * 1_000_000, 40 * 1_000_000], t_us=100_000_000) == 60.0
    assert aggregate("count_distinct", ["ORD", "LAX", "ORD", "BOS", "LAX"]) == 3.0  # strings
    assert aggregate("count_distinct", [1.0, 1.0, 2.5]) == 2.0
    # empty windows: the distinct count 0, the sequence (), the others missing
    assert aggregate("count_distinct", []) == 0.0 and aggregate("last_k", [], k=3) == ()
    for function in ("stddev", "last", "time_since_last", "ratio"):
        assert aggregate(function, []) is None
    with pytest.raises(ValueError, match="unknown aggregate 'median'"):
        aggregate("median", [1.0])


def _new_obs(history, time_us, event_id, **fields):
    """An observation as its group's stage gives it: one value per series of the history."""
    names = {name for series in history.series for name in series}
    values = tuple(fields.get(name) for name in sorted(names))
    index = {name: i for i, name in enumerate(sorted(names))}
    return PendingEvent(time_us, OBSERVATION, event_id,
                        tuple(series_value(values, tuple(index[n] for n in series)) for series in history.series))


def _tie_events(history, t):
    return [
        _new_obs(history, t - 30 * MIN, "x", dep_delay=1.0, dest="ORD"),
        _new_obs(history, t - 10 * MIN, "a", dep_delay=2.0, dest="LAX"),
        _new_obs(history, t - 10 * MIN, "c", dep_delay=3.0),  # no dest: not in the distinct count
        _new_obs(history, t - 10 * MIN, "b", dep_delay=4.0, dest="ORD"),
        _new_obs(history, t - 5 * MIN, "y", dest="BOS"),  # no delay: an observation for since_any only
    ]


def test_ties_on_time_go_to_the_larger_event_id_whatever_the_insertion_order():
    t = 10 * H
    history = KeyHistory(NEW)
    events = _tie_events(history, t)
    # Sorted by (time, id): x (1), a (2), b (4), c (3) hold a delay; the latest is c (the larger id at 09:50).
    #   last: 3; last 3, newest first: c, b, a = (3, 4, 2); since the latest with a delay: 10 min = 600 s;
    #   since any (y at 09:55): 300 s; distinct dests {ORD, LAX, BOS} = 3; stddev of {1, 2, 4, 3}: sqrt(1.25)
    expected = (3.0, 300.0, 600.0, (3.0, 4.0, 2.0), 3.0, math.sqrt(1.25))
    for order in (events, events[::-1], [events[i] for i in (2, 0, 4, 3, 1)]):
        for applied in (KeyHistory(NEW).apply([*order, req(t)]),
                        KeyHistory(NEW).apply([req(t), *order])):  # apply sorts: requests see the same
            assert applied[0][0][1] == expected
        added = KeyHistory(NEW)
        for event in order:  # straight into the history, in this order
            added.add_observation(event.time_us, event.values, event.event_id)
        assert added.features_at(t) == expected


def test_new_aggregates_at_the_window_edges():
    t = 10 * H
    history = KeyHistory(NEW)
    events = [_new_obs(history, t - H, "edge", dep_delay=1.5, dest="ORD"),  # exactly t - W: in
              _new_obs(history, t - H - 1, "before", dep_delay=1000.0, dest="LAX"),  # out
              _new_obs(history, t, "at_t", dep_delay=99.0, dest="BOS")]  # at t: out
    # Only `edge` is in [t - 1h, t): last 1.5, 3600 s since it, (1.5,), one dest, stddev 0.
    assert history.apply([*events, req(t)])[0][0][1] == (1.5, 3600.0, 3600.0, (1.5,), 1.0, 0.0)
    # A microsecond later, `edge` is out too and `at_t` in: 1 us = 1e-6 s since it.
    assert KeyHistory(NEW).apply([*events, req(t + 1)])[0][0][1] == (99.0, 1e-6, 1e-6, (99.0,), 1.0, 0.0)


def test_new_aggregates_on_an_empty_window():
    history = KeyHistory(NEW)
    events = [_new_obs(history, 0, "old", dep_delay=5.0, dest="ORD"), req(2 * H)]
    assert history.apply(events)[0][0][1] == (None, None, None, (), 0.0, None)
    assert KeyHistory(NEW).apply([req(0)])[0][0][1] == (None, None, None, (), 0.0, None)


def test_time_since_last_with_and_without_its_field():
    t = 5 * H
    history = KeyHistory((SINCE_ANY_1H, SINCE_DELAY_1H))
    assert history.series == (("dep_delay",),)  # time_since_last of any observation reads the count's times
    events = [_new_obs(history, t - 40 * MIN, "a", dep_delay=3.0), _new_obs(history, t - 15 * MIN, "b")]
    # any observation: b, 15 min = 900 s ago; with a delay: a, 40 min = 2400 s ago
    assert history.apply([*events, req(t)])[0][0][1] == (900.0, 2400.0)
    only_missing = KeyHistory((SINCE_ANY_1H, SINCE_DELAY_1H))
    assert only_missing.apply([_new_obs(only_missing, t - MIN, "b"), req(t)])[0][0][1] == (60.0, None)


def test_last_k_keeps_only_k_and_a_tie_keeps_the_larger_ids():
    t = 2 * H
    history = KeyHistory((LAST3_1H,))
    events = [_new_obs(history, t - MIN, event_id, dep_delay=value)
              for event_id, value in (("d", 4.0), ("a", 1.0), ("c", 3.0), ("b", 2.0))]
    # All at the same time: newest first is the larger id first: d, c, b (a is the fourth: dropped).
    for order in (events, events[::-1]):
        assert KeyHistory((LAST3_1H,)).apply([*order, req(t)])[0][0][1] == ((4.0, 3.0, 2.0),)


# ---- property: the engine equals a brute-force scan of the window ----

FEATURES_ALL = (
    COUNT_1H, MEAN_1H, MAX_1H, MIN_1H, SUM_3H,
    WindowedFeature("n_2h", TAIL, "count", 7200),
    WindowedFeature("std_2h", TAIL, "stddev", 7200, "dep_delay"),
    WindowedFeature("ratio_2h", TAIL, "ratio", 7200, "dep_delay", "weight"),
    WindowedFeature("last_k1_2h", TAIL, "last_k", 7200, "dep_delay", k=1),
    WindowedFeature("last_k4_3h", TAIL, "last_k", 3 * 3600, "dep_delay", k=4),
    WindowedFeature("dests_2h", TAIL, "count_distinct", 7200, "dest"),
    WindowedFeature("delays_3h", TAIL, "count_distinct", 3 * 3600, "dep_delay"),
    *NEW,
)


def _brute_force(feature, observations, t_us):
    """The feature over [t - W, t), scanning every observation, in plain Python."""
    window = sorted((o for o in observations if t_us - feature.window_s * 1_000_000 <= o["time"] < t_us),
                    key=lambda o: (o["time"], o["id"]))
    if feature.aggregate == "count":
        return float(len(window))
    series = [o for o in window if all(o[name] is not None for name in feature.inputs)]
    if feature.aggregate == "time_since_last":
        return (t_us - series[-1]["time"]) / 1_000_000 if series else None
    if feature.aggregate == "last_k":
        return tuple(float(o[feature.field]) for o in series[::-1][:feature.k])
    values = [o[feature.field] for o in series]
    if feature.aggregate == "count_distinct":
        return float(len(set(values)))
    if not values:
        return None
    if feature.aggregate == "ratio":
        denominator = math.fsum(o[feature.per] for o in series)
        return math.fsum(values) / denominator if denominator else None
    return {"sum": lambda: math.fsum(values), "mean": lambda: math.fsum(values) / len(values),
            "min": lambda: float(min(values)), "max": lambda: float(max(values)),
            "last": lambda: float(values[-1]), "stddev": lambda: statistics.pstdev(values)}[feature.aggregate]()




# Any magnitude up to 1e6, subnormal ones too (an exact variance whose double would underflow), and
# values whose sums need fsum.
_values = st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
                    st.sampled_from([0.0, -0.0, 0.1, 0.2, 0.3, 1e-300, 5e-324, 123456.789]))
_times = st.one_of(st.integers(0, 16).map(lambda q: q * 15 * MIN),  # on a 15 min grid: ties and edges
                   st.integers(0, 4 * H))
_observation = st.fixed_dictionaries({
    "time": _times, "dep_delay": _values, "weight": st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, -1.0])),
    "dest": st.one_of(st.none(), st.sampled_from(["ORD", "LAX", "BOS"]))})


@settings(max_examples=75, deadline=None)
@given(observations=st.lists(_observation, max_size=25), request_times=st.lists(_times, min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_features_equal_a_brute_force_scan_whatever_the_insertion_order(observations, request_times, seed):
    for index, o in enumerate(observations):  # unique ids, in an order unrelated to time
        o["id"] = f"{(index * 7919) % 1000:03d}-{index}"
    # Requests also exactly at observation times and at the 1 h, 2 h and 3 h edges after them.
    times = request_times + [o["time"] + shift for o in observations[:4] for shift in (0, H, 2 * H, 3 * H)]
    histories = []
    for order in (observations, random.Random(seed).sample(observations, len(observations))):
        history = KeyHistory(FEATURES_ALL)
        for o in order:
            values = tuple(series_value(tuple(o[name] for name in ("dep_delay", "dest", "weight")),
                                        tuple(("dep_delay", "dest", "weight").index(n) for n in series))
                           for series in history.series)
            history.add_observation(o["time"], values, o["id"])
        histories.append(history)
    for t in times:
        first, second = (history.features_at(t) for history in histories)
        assert bits(first) == bits(second), t  # bit for bit, whatever the insertion order
        restored = KeyHistory.from_state(FEATURES_ALL, histories[0].to_state())
        assert bits(restored.features_at(t)) == bits(first)
        for feature, value in zip(FEATURES_ALL, first):
            expected = _brute_force(feature, observations, t)
            if feature.aggregate == "stddev" and value is not None and expected is not None:
                assert math.isclose(value, expected, rel_tol=1e-12, abs_tol=0.0), (feature.name, value, expected)
            else:
                assert value == expected, (feature.name, t, value, expected)


def test_stddev_of_extreme_spreads():
    assert aggregate("stddev", [1e-160, 3e-160]) == statistics.pstdev([1e-160, 3e-160]) == 1e-160
    assert aggregate("stddev", [0.0, 2.4451692097634286e-256]) == statistics.pstdev([0.0, 2.4451692097634286e-256])
    assert aggregate("stddev", [1e200, -1e200]) == 1e200


def test_a_request_beyond_the_lateness_sees_only_the_horizon_whatever_the_eviction():
    """Later than lateness_s behind the latest event, a request is not answered
    exactly: it reads the observations since the horizon (longest window 3 h
    plus lateness 0), whether or not the older ones were evicted yet."""
    events = [obs(0, 1.0, "a"), obs(H, 2.0, "b")] + [obs(5 * H + i * MIN, 4.0, f"c{i}") for i in range(10)]
    late = req(3 * H + H // 2, "late")  # its 3 h window [0.5 h, 3.5 h) holds b; the horizon at 5 h 9 min starts later
    held = KeyHistory(FEATURES)
    held.apply(events)
    assert 1 * H in held.times[0]  # b still held: less than a quarter of the history could go
    restored = KeyHistory.from_state(FEATURES, held.to_state())  # the state keeps only the horizon
    assert 1 * H not in restored.times[0]
    (_, from_held), = held.apply([late])[0]
    (_, from_state), = restored.apply([late])[0]
    assert from_held == from_state == (0.0, None, None, None, None)  # b is behind the horizon either way
