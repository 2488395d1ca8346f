"""The point-in-time arithmetic against values computed by hand."""

import math

import pytest

from transforms.point_in_time import OBSERVATION, REQUEST, KeyHistory, PendingEvent, aggregate
from transforms.spec import WindowedFeature

H = 3_600_000_000
COUNT_1H = WindowedFeature("n_1h", "origin", "count", 3600)
MEAN_1H = WindowedFeature("mean_1h", "origin", "mean", 3600, "dep_delay")
MAX_1H = WindowedFeature("max_1h", "origin", "max", 3600, "dep_delay")
MIN_1H = WindowedFeature("min_1h", "origin", "min", 3600, "dep_delay")
SUM_3H = WindowedFeature("sum_3h", "origin", "sum", 3 * 3600, "dep_delay")
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
        assert len(history.times[0]) <= 3 * 60 + 1


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


FARE_PER_MILE_1H = WindowedFeature("fare_per_mile_1h", "area", "ratio", 3600, "fare", "miles")


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
    ratio_3h = WindowedFeature("fare_per_mile_3h", "area", "ratio", 3 * 3600, "fare", "miles")
    fare_mean = WindowedFeature("fare_mean_1h", "area", "mean", 3600, "fare")
    assert KeyHistory((FARE_PER_MILE_1H, ratio_3h, fare_mean, COUNT_1H)).series == (("fare",), ("fare", "miles"))
