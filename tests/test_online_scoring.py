"""Online scoring without a store or a server: the store layout's answers
against the batch engine, and the parsing of instances. Pure and fast.

The reference is the batch path's columnar engine (transforms/columnar_windows.py,
`answer_events`), a second implementation of the windows: the online answer
goes through the store's cell encoding, the time range a read asks for, and
`KeyHistory`; both must give the same values bit for bit."""

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app.online.layout import (decode_observation, encode_observation, horizon_s, observation_cells,
                                    parse_table_path, rows_to_read, store_lag_s)
from beam_app.online import layout as store_layout
from beam_app.online.scorer import InstanceError, parse_body, parse_instance
from tests.scan_engine import bits
from transforms.columnar_windows import answer_events
from transforms.event_time import TimeBounds
from transforms.events import Event, time_us_to_rfc3339
from transforms.feature_layout import EventLayout, feature_groups, key_of, to_pending
from transforms.parse import EventValidator
from transforms.spec import load_spec

SPEC = load_spec("flights")
LAYOUT = EventLayout.of(SPEC)
GROUPS = feature_groups(SPEC)
MIN = 60_000_000
T0 = 1_796_000_000_000_000  # 2026-12-01: any time will do


_delays = st.one_of(st.none(), st.integers(-60, 600).map(float),
                    st.sampled_from([0.0, -0.0, 0.5, 1e-300, 5e-324, 123.25, -7.0, 1e15 + 0.5]))
_times = st.one_of(st.integers(0, 48).map(lambda q: T0 + q * 30 * MIN),  # a grid: ties and window edges
                   st.integers(T0, T0 + 26 * 60 * MIN),
                   st.integers(T0, T0 + 26 * 60 * MIN).map(lambda t: t - t % 1000 + 999))  # a ms's last µs
_observation = st.tuples(st.sampled_from(["EWR", "JFK"]), st.sampled_from(["UA", "B6"]),
                         st.sampled_from(["ORD", "LAX"]), st.sampled_from([None, "N1", "N2"]), _times, _delays)


def _observation_event(index, drawn) -> Event:
    origin, carrier, dest, tailnum, time_us, delay = drawn
    return Event(f"o{index:04d}", "observation", time_us,
                 {"carrier": carrier, "origin": origin, "dest": dest, "tailnum": tailnum, "dep_delay": delay})


def _request_event(index, drawn) -> Event:
    origin, carrier, dest, tailnum, time_us, _ = drawn
    return Event(f"r{index:04d}", "request", time_us,
                 {"carrier": carrier, "origin": origin, "dest": dest, "tailnum": tailnum})


def _store(observations) -> dict[bytes, list]:
    """What the store holds: each observation's cells by row (a replay rewrites the same cell)."""
    rows: dict[bytes, dict] = {}
    for event in observations:
        for cell in observation_cells(LAYOUT, GROUPS, event):
            rows.setdefault(cell.row, {})[cell.qualifier] = cell
    return rows


def _read(rows, request) -> dict[bytes, list]:
    """The cells a read for `request` gets: each row's cells whose timestamp is in the read's range,
    as Bigtable's timestamp range filter gives them."""
    out = {}
    for read in rows_to_read(LAYOUT, GROUPS, request):
        cells = rows.get(read.row, {}).values()
        out[read.row] = [(c.qualifier, c.value) for c in cells if read.start_ms <= c.timestamp_ms < read.end_ms]
    return out


def _batch_answers(events) -> dict[str, tuple]:
    """Every request's features from the batch path's columnar engine over all events."""
    answers = {event.event_id: [None] * len(SPEC.windowed_features) for event in events if event.role == "request"}
    for group in GROUPS:
        rows = []
        for event in events:
            item = LAYOUT.to_item(event, ())
            if item[1] not in (0, group.observation_rank):
                continue
            key = key_of(item, group)
            if key is None:
                continue
            pending = to_pending(item, group)
            rows.append((key, pending.event_id, pending.rank, pending.time_us, pending.values))
        for event_id, values in answer_events(group.features, rows):
            for slot, value in zip(group.slots, values):
                answers[event_id][slot] = value
    return {event_id: tuple(values) for event_id, values in answers.items()}


@settings(max_examples=60, deadline=None)
@given(st.lists(_observation, max_size=40), st.lists(_observation, min_size=1, max_size=8))
def test_answers_from_the_store_equal_the_batch_engine_bit_for_bit(observations, requests):
    observed = [_observation_event(i, drawn) for i, drawn in enumerate(observations)]
    asked = [_request_event(i, drawn) for i, drawn in enumerate(requests)]
    # And requests just after observations of the same keys: within the same millisecond, or the next.
    asked += [Event(f"q{i:04d}-{delta}", "request", event.time_us + delta, dict(event.fields, dep_delay=None))
              for i, event in enumerate(observed[:4]) for delta in (1, 1000)]
    expected = _batch_answers(observed + asked)
    rows = _store(observed)
    for request in asked:
        online = store_layout.answer(LAYOUT, GROUPS, request, len(SPEC.windowed_features), _read(rows, request),
                                     allowed_lateness_s=3600)
        assert bits(online) == bits(expected[request.event_id]), request


def test_observation_cells_one_per_group_of_its_keys():
    event = Event("o1", "observation", T0 + 1234, {"carrier": "UA", "origin": "EWR", "dest": "ORD", "tailnum": None,
                                                   "dep_delay": -0.0})
    cells = observation_cells(LAYOUT, GROUPS, event)
    # No tailnum: no tailnum row; every other group of the kind gets one cell, stamped in ms.
    assert sorted(c.row for c in cells) == [b"carrier#UA", b"dest#ORD", b"origin#EWR", b'origin_dest#["EWR","ORD"]']
    assert {c.qualifier for c in cells} == {b"o1"} and {c.timestamp_ms for c in cells} == {(T0 + 1234) // 1000}
    time_us, values = decode_observation(cells[0].value)
    assert time_us == T0 + 1234 and values == ("UA", "EWR", "ORD", None, -0.0)
    assert str(values[-1]) == "-0.0"
    requests = observation_cells(LAYOUT, GROUPS, Event("r1", "request", T0, {"origin": "EWR"}))
    assert requests == []


@given(st.integers(-2 ** 62, 2 ** 62), st.lists(st.one_of(
    st.none(), st.text(max_size=5), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False, allow_infinity=False)),
    max_size=6))
def test_observation_values_round_trip_exactly(time_us, values):
    decoded_time, decoded = decode_observation(encode_observation(time_us, tuple(values)))
    assert decoded_time == time_us and bits(decoded) == bits(tuple(values))
    assert [type(v) for v in decoded] == [type(v) for v in values]


def test_reads_ask_for_each_groups_longest_window_in_whole_ms():
    request = Event("r1", "request", T0 + 500, {"carrier": "UA", "origin": "EWR", "dest": "ORD", "tailnum": None})
    reads = {read.row: read for read in rows_to_read(LAYOUT, GROUPS, request)}
    assert b"tailnum#None" not in reads and len(reads) == 4  # no tailnum: its features stay missing
    origin = reads[b"origin#EWR"]  # origin's longest window: 3 h
    assert (origin.start_ms, origin.end_ms) == ((T0 + 500 - 3 * 3600 * 10 ** 6) // 1000, T0 // 1000 + 1)
    route = reads[b'origin_dest#["EWR","ORD"]']  # 24 h
    assert route.start_ms == (T0 + 500 - 24 * 3600 * 10 ** 6) // 1000


def test_table_paths_and_horizon_and_lag():
    path = parse_table_path("projects/p/instances/i/tables/t")
    assert (path.project, path.instance, path.table) == ("p", "i", "t") and str(path) == "projects/p/instances/i/tables/t"
    for bad in ("p:i.t", "projects/p/tables/t", "", "projects/p/instances/i/tables/t/x"):
        with pytest.raises(ValueError, match="projects/<project>/instances/<instance>/tables/<table>"):
            parse_table_path(bad)
    assert horizon_s(SPEC.max_window_s, 3600) == 25 * 3600
    assert store_lag_s(None, T0) is None
    assert store_lag_s(T0, T0) == 0 and store_lag_s(T0 + 1, T0) == 0
    assert store_lag_s(T0 - 2_500_000, T0) == 2.5


# Parsing instances: a valid one becomes the event the stream would have made; anything else is
# InstanceError naming the instance, the field (when there is one) and the reason; nothing else escapes.
NOW = T0 + 10 * MIN
BOUNDS = TimeBounds(max_future_s=300, allowed_lateness_s=3600)
VALIDATE = EventValidator(SPEC)
VALID = {"event_id": "20261201-UA1545-EWR", "role": "request", "carrier": "UA", "origin": "EWR", "dest": "IAH",
         "distance": 1400, "hour": 5, "minute": 15, "month": 12, "day_of_week": 1, "tailnum": "N24211"}


def test_a_valid_instance_is_the_streams_event():
    event = parse_instance(VALIDATE, dict(VALID, event_time=time_us_to_rfc3339(NOW - MIN)), NOW, BOUNDS)
    assert event.event_id == VALID["event_id"] and event.time_us == NOW - MIN and event.role == "request"
    assert event.fields["distance"] == 1400.0 and event.fields["carrier"] == "UA"
    # No event_time: now. No role: a request.
    now = parse_instance(VALIDATE, {k: v for k, v in VALID.items() if k != "role"}, NOW, BOUNDS)
    assert now.time_us == NOW


@pytest.mark.parametrize("change, field, reason", [
    ({"carrier": ""}, "carrier", "missing"),
    ({"carrier": 7}, "carrier", "expected a non-empty string"),
    ({"distance": "far"}, "distance", "expected a number"),
    ({"day_of_week": 7}, "day_of_week", "above the maximum"),
    ({"event_id": "nope"}, "event_id", "does not match"),
    ({"event_id": 5}, "event_id", "non-empty string"),
    ({"role": "observation"}, "role", "only request events"),
    ({"event_time": "yesterday"}, "event_time", "not an RFC 3339 timestamp"),
    ({"event_time": 1796000000}, "event_time", "RFC 3339 string"),
    ({"event_time": "2026-12-01T10:00:00"}, "event_time", "needs a UTC offset"),
    ({"event_time": time_us_to_rfc3339(NOW - 3601 * 10 ** 6)}, "event_time", "more than --allowed_lateness_s 3600"),
    ({"event_time": time_us_to_rfc3339(NOW + 301 * 10 ** 6)}, "event_time", "more than --max_future_s 300"),
])
def test_a_bad_instance_names_its_field_and_reason(change, field, reason):
    with pytest.raises(InstanceError, match=reason) as raised:
        parse_body(VALIDATE, {"instances": [VALID, dict(VALID, **change)]}, NOW, BOUNDS)
    assert raised.value.index == 1 and raised.value.field == field
    assert raised.value.to_json() == {"error": raised.value.reason, "instance": 1, "field": field}


@pytest.mark.parametrize("body", [None, [], {"instance": []}, {"instances": []}, {"instances": {}},
                                  {"instances": [VALID] * 1001}, {"instances": ["text"]}])
def test_a_malformed_call_is_refused(body):
    with pytest.raises(InstanceError):
        parse_body(VALIDATE, body, NOW, BOUNDS)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=3), max_leaves=8)
_field_values = st.one_of(_json, st.sampled_from(["UA", "EWR", "2026-12-01T10:05:00Z", "20261201-UA1-EWR", "request"]),
                          st.integers(-5, 3000))


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.dictionaries(st.sampled_from([*VALID, "event_time", "label", "other"]), _field_values)),
       st.dictionaries(st.sampled_from([*VALID, "event_time"]), _field_values))
def test_any_instance_is_an_event_or_a_named_refusal(instance, change):
    for candidate in (instance, dict(VALID, **change)):
        try:
            event = parse_instance(VALIDATE, candidate, NOW, BOUNDS, index=0)
        except InstanceError as err:
            assert err.reason and err.index == 0
            assert err.field is None or err.field in {*VALID, "event_time", "label"}
            json.dumps(err.to_json())  # what the service sends back
        else:
            assert event.role == "request" and NOW - 3600 * 10 ** 6 <= event.time_us <= NOW + 300 * 10 ** 6
            assert set(event.fields) >= {"carrier", "origin"}


def test_times_in_the_store_are_bigtable_milliseconds():
    # A cell timestamp is an event time floored to the millisecond: Bigtable's granularity.
    from beam_app.online.bigtable_store import _timestamp

    assert _timestamp(1_796_000_000_123) == dt.datetime(2026, 11, 30, 0, 53, 20, 123000, tzinfo=dt.timezone.utc)
    assert _timestamp(1_796_000_000_123).timestamp() == 1_796_000_000.123


# The batcher: calls that arrive while a batch is scored are scored together next; each gets its own answers.
def _scored(events):
    from beam_app.online.scorer import Scored

    return Scored([{"event_id": e.event_id} for e in events], [{"row": e.event_id} for e in events],
                  [float(len(e.event_id)) for e in events], rows_read=10 * len(events))


def test_calls_waiting_on_a_batch_are_scored_together_and_each_gets_its_own_answers():
    import threading

    from beam_app.online.scorer import Batcher

    started, release, seen = threading.Event(), threading.Event(), []

    def score(events):
        seen.append([e.event_id for e in events])
        started.set()
        release.wait(10)
        return _scored(events)

    batcher = Batcher(score)
    try:
        event = lambda event_id: Event(event_id, "request", T0, {})  # noqa: E731
        first = batcher.submit([event("a")])
        assert started.wait(10)  # the first call is being scored: the next two wait, then go together
        second, third = batcher.submit([event("bb"), event("ccc")]), batcher.submit([event("d")])
        release.set()
        answers = [future.result(10) for future in (first, second, third)]
    finally:
        batcher.close()
    assert seen == [["a"], ["bb", "ccc", "d"]]
    assert [a.body["predictions"] for a in answers] == [[{"event_id": "a"}], [{"event_id": "bb"}, {"event_id": "ccc"}],
                                                       [{"event_id": "d"}]]
    assert [a.served_rows for a in answers] == [[{"row": "a"}], [{"row": "bb"}, {"row": "ccc"}], [{"row": "d"}]]
    assert [a.lag_s for a in answers] == [1.0, 3.0, 1.0]  # a call's largest lag
    assert [a.batch_calls for a in answers] == [1, 2, 2]
    assert [a.rows_read for a in answers] == [10, 30, 0]  # a batch's reads counted once


def test_a_batch_that_fails_fails_each_of_its_calls_and_the_next_batch_is_scored():
    from beam_app.online.bigtable_store import StoreUnavailable
    from beam_app.online.scorer import Batcher

    calls = []

    def score(events):
        calls.append(len(events))
        if len(calls) == 1:
            raise StoreUnavailable("online store down")
        return _scored(events)

    batcher = Batcher(score)
    try:
        failed = batcher.submit([Event("a", "request", T0, {})])
        with pytest.raises(StoreUnavailable, match="down"):
            failed.result(10)
        assert batcher.submit([Event("b", "request", T0, {})]).result(10).body == {"predictions": [{"event_id": "b"}]}
    finally:
        batcher.close()
