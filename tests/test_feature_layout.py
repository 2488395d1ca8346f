"""The windowed-feature engine's pure parts, with no pipeline: the element
layout and feature groups (transforms/feature_layout.py), what the streaming
DoFns decide (transforms/unbounded_features.py) and the batch buckets
(transforms/bounded_features.py). Every expected value is worked out by hand."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import HOUR_US, MIN_US, observation, request
from transforms.bounded_features import answer_bucket, bucket_span_us, buckets_of
from transforms.event_time import timer_us
from transforms.events import Event
from transforms.feature_layout import (FEATURES, EventLayout, event_key, feature_groups, fill, key_of,
                                       reads, state_key, to_pending)
from transforms.point_in_time import OBSERVATION, REQUEST, PendingEvent
from transforms.spec import load_spec
from transforms.unbounded_features import (REQUEST_PART, expected_parts, joined_request, next_release_us,
                                           release_time, split_release)

@pytest.fixture(scope="module")
def weather_spec():
    return load_spec("flights_weather")


def weather(event_id: str, time_us: int, origin: str = "EWR", visib=10.0, precip=0.0, wind_speed=5.0) -> Event:
    return Event(event_id, "weather", time_us, {"origin": origin, "visib": visib, "precip": precip,
                                                "wind_speed": wind_speed})


def _item(spec, event):
    return EventLayout.of(spec).to_item(event, (None,) * len(spec.windowed_features))


# ---- layout and groups ----

def test_the_layout_names_each_ranks_values(weather_spec):
    layout = EventLayout.of(weather_spec)
    assert layout.roles == ("request", "observation", "weather")
    assert layout.names == (
        ("carrier", "origin", "dest", "distance", "hour", "minute", "month", "day_of_week", "tailnum", "dep_delay"),
        ("carrier", "origin", "dest", "tailnum", "dep_delay"),
        ("origin", "visib", "precip", "wind_speed"))
    assert (layout.rank("request"), layout.rank("observation"), layout.rank("weather")) == (0, 1, 2)
    event = weather("20130101T06-EWR", 7, visib=None)
    item = layout.to_item(event, (None,) * 14)
    assert item == ("20130101T06-EWR", 2, 7, ("EWR", None, 0.0, 5.0), (None,) * 14)
    assert layout.to_row(item).event == event


def test_feature_groups_of_flights(flights_spec):
    groups = feature_groups(flights_spec)
    assert [(g.name, g.kind, g.key) for g in groups] == [
        ("origin", "observation", ("origin",)), ("carrier", "observation", ("carrier",)),
        ("tailnum", "observation", ("tailnum",)), ("origin_dest", "observation", ("origin", "dest")),
        ("dest", "observation", ("dest",))]
    # Spec order: origin has features 0-3 and the stddev (10); tailnum 5-7; route 8; dest 9.
    assert [g.slots for g in groups] == [(0, 1, 2, 3, 10), (4,), (5, 6, 7), (8,), (9,)]
    # request values: carrier 0, origin 1, dest 2, ..., tailnum 8; a departure's: carrier 0, origin 1, dest 2,
    # tailnum 3, dep_delay 4
    assert [g.key_index for g in groups] == [((1,), (1,)), ((0,), (0,)), ((8,), (3,)), ((1, 2), (1, 2)),
                                             ((2,), (2,))]
    assert all(g.series_index == ((4,),) for g in groups)  # every group reads dep_delay (and counts)
    assert all(g.observation_rank == 1 for g in groups)
    assert [g.counts_late_requests for g in groups] == [True, False, False, False, False]
    assert [g.counts_late_observations for g in groups] == [True, False, False, False, False]


def test_feature_groups_of_two_kinds(flights_spec, weather_spec):
    groups = feature_groups(weather_spec)
    assert groups[:5] == feature_groups(flights_spec)
    (weather_group,) = groups[5:]
    assert (weather_group.name, weather_group.kind, weather_group.key) == ("weather_origin", "weather", ("origin",))
    assert weather_group.slots == (11, 12, 13) and weather_group.observation_rank == 2
    assert weather_group.key_index == ((1,), (0,))
    # series sorted by name: precip (2), visib (1), wind_speed (3) of a weather event's values
    assert weather_group.series_index == ((2,), (1,), (3,))
    # The first group of each kind counts its late observations; only the first group late requests.
    assert (weather_group.counts_late_requests, weather_group.counts_late_observations) == (False, True)


def test_key_of_composite_and_missing_parts(flights_spec):
    origin, carrier, tailnum, route, dest = feature_groups(flights_spec)
    with_tail = _item(flights_spec, request("r", 0, tailnum="N14228"))
    without = _item(flights_spec, request("r", 0))
    assert key_of(with_tail, route) == '["EWR","ORD"]'  # the parts as a JSON list
    assert key_of(with_tail, tailnum) == "N14228" and key_of(without, tailnum) is None
    assert key_of(without, origin) == "EWR" and key_of(without, carrier) == "UA"
    departure = _item(flights_spec, observation("o", 0, 3.0, origin="JFK", dest="BOS", tailnum="N1"))
    assert (key_of(departure, route), key_of(departure, tailnum), key_of(departure, dest)) == (
        '["JFK","BOS"]', "N1", "BOS")
    # A composite key with a part missing is missing, not a partial key.
    values = list(departure[3])
    values[2] = None  # dest
    no_dest = departure[:3] + (tuple(values),) + departure[4:]
    assert key_of(no_dest, route) is None and key_of(no_dest, dest) is None and key_of(no_dest, origin) == "JFK"
    # Parts are joined, not concatenated: ("AB", "C") and ("A", "BC") differ.
    assert key_of(("x", 1, 0, ("UA", "AB", "C", None, 1.0), ()), route) != key_of(
        ("x", 1, 0, ("UA", "A", "BC", None, 1.0), ()), route)


def test_event_key_is_none_for_another_kind_or_a_missing_key(weather_spec):
    layout = EventLayout.of(weather_spec)
    origin, _, tailnum, route, _, weather_origin = feature_groups(weather_spec)
    report = weather("20130101T06-JFK", 0, origin="JFK")
    departure = observation("20130101-UA1-EWR", 0, 3.0, tailnum="N1")
    assert event_key(layout, weather_origin, report) == "JFK"
    assert event_key(layout, origin, report) is None  # a departure group does not read the weather
    assert event_key(layout, weather_origin, departure) is None  # nor the weather group departures
    assert event_key(layout, origin, departure) == "EWR" and event_key(layout, route, departure) == '["EWR","ORD"]'
    assert event_key(layout, tailnum, request("r", 0)) is None  # no tail number on the request
    assert event_key(layout, weather_origin, request("r", 0, origin="LGA")) == "LGA"  # every group reads requests


def test_reads_to_pending_and_fill(weather_spec):
    groups = feature_groups(weather_spec)
    origin, weather_origin = groups[0], groups[5]
    req = _item(weather_spec, request("r", 5))
    dep = _item(weather_spec, observation("o", 3, 7.5))
    report = _item(weather_spec, weather("w", 4, visib=None, precip=0.25, wind_speed=12.0))
    assert all(reads(req, g) for g in groups)
    assert [reads(dep, g) for g in groups] == [True] * 5 + [False]
    assert [reads(report, g) for g in groups] == [False] * 5 + [True]
    assert to_pending(req, origin) == PendingEvent(5, REQUEST, "r", (), req)
    assert to_pending(dep, origin) == PendingEvent(3, OBSERVATION, "o", (7.5,), dep)
    # the weather group's series: precip, visib, wind_speed
    assert to_pending(report, weather_origin) == PendingEvent(4, OBSERVATION, "w", (0.25, None, 12.0), report)
    filled = fill(req, weather_origin.slots, (3.0, 0.5, 20.0))
    assert filled[FEATURES] == (None,) * 11 + (3.0, 0.5, 20.0) and filled[:FEATURES] == req[:FEATURES]


def test_state_key_is_the_key_or_a_stable_shard():
    assert state_key('["EWR","ORD"]', None) == '["EWR","ORD"]'
    # crc32 is stable across processes (hash() is not): shard = crc32 % shards
    assert state_key("EWR", 4) == f"shard-{zlib.crc32(b'EWR') % 4}"
    assert state_key("EWR", 1) == state_key("N14228", 1) == "shard-0"
    assert {state_key(f"N{i}", 3) for i in range(100)} == {"shard-0", "shard-1", "shard-2"}


# ---- what the streaming DoFns decide ----

def test_release_time_is_the_end_of_the_events_step():
    step = 600_000
    assert [release_time(t, step) for t in (0, 1, 599_999, 600_000, 600_001, 1_200_000)] == [
        0, step, step, step, 2 * step, 2 * step]
    assert release_time(-1, step) == 0  # ceiling, also below 0
    # No step: the event's own time, up to the next whole millisecond (a timer's resolution).
    assert release_time(12_000, 0) == 12_000 and release_time(12_345, 0) == release_time(12_345, 1) == 13_000


def test_split_release_keeps_what_the_watermark_has_not_passed(flights_spec):
    origin = feature_groups(flights_spec)[0]
    items = [_item(flights_spec, e) for e in (
        request("r1", 10, origin="EWR"), observation("o1", 5, 1.0, origin="JFK"),
        observation("o2", 10, 2.0, origin="EWR"), request("r2", 11, origin="JFK"),
        observation("o3", 30, 3.0, origin="EWR"))]
    ready, rest = split_release(items, 10, origin)  # up to and including 10
    assert {key: [item[0] for item in group] for key, group in ready.items()} == {"EWR": ["r1", "o2"], "JFK": ["o1"]}
    assert [item[0] for item in rest] == ["r2", "o3"]
    assert split_release([], 10, origin) == ({}, [])
    # the next timer: the earliest event left (11 µs), at the end of its step, never finer than a millisecond
    assert next_release_us(rest, 0) == 1000 and next_release_us(rest, 1000) == 1000
    assert next_release_us(rest, 20_000) == 20_000
    assert next_release_us([], 600) is None


def test_expected_parts_are_the_groups_whose_key_the_request_has(flights_spec, weather_spec):
    groups = feature_groups(flights_spec)
    with_tail = _item(flights_spec, request("r", 0, tailnum="N1"))
    without = _item(flights_spec, request("r", 0))
    assert expected_parts(with_tail, groups) == frozenset({0, 1, 2, 3, 4})
    assert expected_parts(without, groups) == frozenset({0, 1, 3, 4})  # no tail number: no tailnum group part
    assert expected_parts(_item(weather_spec, request("r", 0)), feature_groups(weather_spec)) == frozenset(
        {0, 1, 3, 4, 5})


def test_joined_request_waits_for_every_expected_part_once(flights_spec):
    groups = feature_groups(flights_spec)
    without = _item(flights_spec, request("r", 0))
    answers = {0: (1.0, 10.0, 10.0, 10.0, 0.0), 1: (20.0,), 3: (15.0,), 4: (12.0,)}
    # In as they arrive (a dict by part index, as the join's state gives them): nothing until all are in.
    collected = {REQUEST_PART: without}
    for index in (3, 0, 1):
        collected[index] = answers[index]
        assert joined_request(dict(collected), groups) is None
    collected[0] = answers[0]  # a redelivered part (at-least-once) stands in for nothing
    assert joined_request(dict(collected), groups) is None
    collected[4] = answers[4]
    joined = joined_request(dict(collected), groups)
    # no tail number: fewer parts, and its three features stay missing
    assert joined[FEATURES] == (1.0, 10.0, 10.0, 10.0, 20.0, None, None, None, 15.0, 12.0, 0.0)
    assert joined[:FEATURES] == without[:FEATURES]
    # The request part itself missing: None, even with every group in.
    assert joined_request({index: answers[index] for index in answers}, groups) is None
    # With a tail number the request waits for the tailnum group too.
    with_tail = _item(flights_spec, request("r", 0, tailnum="N1"))
    assert joined_request({REQUEST_PART: with_tail, **answers}, groups) is None
    joined = joined_request({REQUEST_PART: with_tail, **answers, 2: (7.0, 1200.0, (7.0, -5.0))}, groups)
    assert joined[FEATURES] == (1.0, 10.0, 10.0, 10.0, 20.0, 7.0, 1200.0, (7.0, -5.0), 15.0, 12.0, 0.0)


def test_a_request_with_no_key_at_all_is_joined_at_once():
    """A spec whose only feature's key is optional: a request without it expects no part."""
    import copy

    from transforms.spec import spec_from_dict

    document = copy.deepcopy(load_spec("flights").to_document())
    document["windowed_features"] = [document["windowed_features"][5]]  # tailnum_last_dep_delay_24h
    spec = spec_from_dict(document)
    groups = feature_groups(spec)
    item = _item(spec, request("r", 0))
    assert expected_parts(item, groups) == frozenset()
    assert joined_request({REQUEST_PART: item}, groups) == item  # features all missing: (None,)


# ---- the batch buckets ----

def test_buckets_of_a_request_and_of_an_observation():
    span, horizon = 100, 50
    assert list(buckets_of(130, REQUEST, horizon, span)) == [1]
    # An observation at o is seen by requests in (o, o + W]: its bucket and those up to (o + W)'s.
    assert list(buckets_of(30, OBSERVATION, horizon, span)) == [0]  # 80: still bucket 0
    assert list(buckets_of(49, OBSERVATION, horizon, span)) == [0]  # a request at 100 sees [50, 100): not 49
    assert list(buckets_of(50, OBSERVATION, horizon, span)) == [0, 1]  # ... but 50 (t - W is in)
    assert list(buckets_of(160, OBSERVATION, 250, span)) == [1, 2, 3, 4]  # a window longer than the span


def test_bucket_span_is_a_day_or_the_longest_window(flights_spec):
    assert {bucket_span_us(g) for g in feature_groups(flights_spec)} == {7 * 24 * HOUR_US}  # at least a week
    taxi_groups = feature_groups(load_spec("chicago_taxi"))
    assert [bucket_span_us(g) for g in taxi_groups] == [30 * 24 * HOUR_US]  # its 30 d windows


def test_answer_bucket_fills_the_requests_of_one_bucket(flights_spec):
    tailnum = feature_groups(flights_spec)[2]
    events = [observation("o1", 0, 30.0, tailnum="N1"), observation("o2", 10 * MIN_US, 5.0, tailnum="N1"),
              observation("o3", 10 * MIN_US, -2.0, tailnum="N1"),  # a tie with o2: o3, the larger id, is last
              request("r1", 40 * MIN_US, tailnum="N1"), request("r0", 5 * MIN_US, tailnum="N1")]
    answered = {item[0]: item[FEATURES] for item in answer_bucket(tailnum, [_item(flights_spec, e) for e in events])}
    # r1 at 00:40: o1, o2, o3 by (time, id); last o3 = -2 at 00:10 (1800 s); last 3 newest first (o3, o2, o1)
    # r0 at 00:05: o1 only; 300 s
    assert answered == {
        "r1": (None,) * 5 + (-2.0, 1800.0, (-2.0, 5.0, 30.0)) + (None,) * 3,
        "r0": (None,) * 5 + (30.0, 300.0, (30.0,)) + (None,) * 3}


def test_composite_key_values_cannot_collide(flights_spec):
    """A part holding what a separator would be must not merge two keys."""
    route = feature_groups(flights_spec)[3]
    first = _item(flights_spec, request("r", 0, origin="EWR", dest='A","B'))
    second = _item(flights_spec, request("r", 0, origin='EWR","A', dest="B"))
    assert key_of(first, route) != key_of(second, route)


@given(st.integers(-10**15, 10**15))
def test_a_timer_is_set_at_or_after_its_time_on_a_whole_millisecond(time_us):
    at = timer_us(time_us)
    assert at % 1000 == 0 and time_us <= at < time_us + 1000


@given(st.lists(st.booleans(), min_size=1, max_size=12), st.randoms(use_true_random=False), st.booleans())
def test_the_join_state_ends_when_every_request_is_joined(tails, rnd, one_shard):
    """The join keeps no timer: its state ends as each request is joined. Every request reaches
    the join once (de-duplicated upstream) and each group whose key it has answers it once, so
    whatever the order its parts arrive in, each request leaves once, and nothing stays pending."""
    from transforms.feature_layout import ID
    from transforms.unbounded_features import take_joined

    spec = load_spec("flights")
    groups = feature_groups(spec)
    parts = []
    for n, tail in enumerate(tails):
        item = _item(spec, request(f"r{n}", n * MIN_US, **({"tailnum": f"N{n}"} if tail else {})))
        parts.append((item[ID], (REQUEST_PART, item)))
        parts.extend((item[ID], (index, (float(index),) * len(groups[index].features)))
                     for index in expected_parts(item, groups))
    rnd.shuffle(parts)
    states: dict[str, list] = {}  # join key -> what its state holds, as _JoinGroupsDoFn keeps it
    joined = []
    for event_id, part in parts:
        key = "shard" if one_shard else event_id
        pending = states.get(key, []) + [(event_id, part)]
        request_, states[key] = take_joined(pending, event_id, groups)
        if request_ is not None:
            joined.append(request_[ID])
    assert sorted(joined) == sorted(f"r{n}" for n in range(len(tails)))
    assert not any(states.values())
