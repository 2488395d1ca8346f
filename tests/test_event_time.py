"""The event time of a live message: the attribute, the payload and the publish
time must agree, within bounds; anything else is a dead letter with its reason.
Hand-written cases, then a fuzz test (hypothesis) of the whole live parse."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.event_time import TimeBounds, attribute_time_us, check_event_time
from transforms.events import Event, InvalidRecord, RawRecord, event_to_json, rfc3339_to_time_us, time_us_to_rfc3339
from transforms.parse import DEAD_LETTERS, LiveStamp, ParseEvents, RecordParser, parse_or_dead_letter

BOUNDS = TimeBounds(max_future_s=300, allowed_lateness_s=3600)
LIVE = LiveStamp("event_time", BOUNDS)
T = rfc3339_to_time_us("2026-12-01T10:00:00Z")
S = 1_000_000


def live_request(time_us: int = T, event_id: str = "20261201-UA1545-EWR") -> Event:
    return Event(event_id, "request", time_us, {
        "carrier": "UA", "origin": "EWR", "dest": "IAH", "distance": 1400.0, "hour": 5, "minute": 15,
        "month": 12, "day_of_week": 1})


def live_observation(time_us: int = T) -> Event:
    return Event("20261201-UA1545-EWR", "observation", time_us, {"carrier": "UA", "origin": "EWR", "dep_delay": 3.0})


def check(event: Event, attribute, publish_us: int = T) -> None:
    check_event_time(event, {} if attribute is None else {"event_time": attribute}, "event_time", publish_us, BOUNDS)


def test_the_attribute_is_rfc3339_or_epoch_milliseconds():
    assert attribute_time_us({"t": "2026-12-01T10:00:00Z"}, "t") == T
    assert attribute_time_us({"t": "2026-12-01T11:00:00+01:00"}, "t") == T
    assert attribute_time_us({"t": str(T // 1000)}, "t") == T


@pytest.mark.parametrize("attributes,reason", [
    (None, "the message has no 'event_time' attribute"),
    ({}, "the message has no 'event_time' attribute"),
    ({"event_time": ""}, "the message has no 'event_time' attribute"),
    ({"event_time": "not-a-time"}, "attribute event_time='not-a-time' is neither RFC 3339 nor ms"),
    ({"event_time": "2026-12-01T10:00:00"}, "neither RFC 3339"),  # no offset
    ({"event_time": "10000000000000000"}, "is not a time (ms since the epoch)"),
    ({"event_time": "١٢٣"}, "neither RFC 3339"),  # Arabic-Indic digits: isdigit() but not a number we take
])
def test_a_missing_or_malformed_attribute_is_refused_with_its_reason(attributes, reason):
    with pytest.raises(InvalidRecord, match="event_time: .*"):
        check_event_time(live_request(), attributes, "event_time", T, BOUNDS)
    with pytest.raises(InvalidRecord) as caught:
        check_event_time(live_request(), attributes, "event_time", T, BOUNDS)
    assert reason in str(caught.value)


def test_attribute_and_payload_agree_to_the_millisecond():
    check(live_request(T + 999), time_us_to_rfc3339(T))  # same ms: Pub/Sub keeps ms
    with pytest.raises(InvalidRecord, match="the payload says 2026-12-01T10:00:01Z but the event_time attribute says "
                                            "'2026-12-01T10:00:00Z'"):
        check(live_request(T + S), time_us_to_rfc3339(T))


def test_an_event_too_far_ahead_of_its_publish_time_is_refused():
    check(live_observation(T + 300 * S), time_us_to_rfc3339(T + 300 * S))  # exactly the skew: kept
    with pytest.raises(InvalidRecord, match="is 301 s after it was published .* --max_future_s 300"):
        check(live_observation(T + 301 * S), time_us_to_rfc3339(T + 301 * S))
    year_9999 = rfc3339_to_time_us("9999-12-31T23:59:59Z")
    with pytest.raises(InvalidRecord, match="--max_future_s"):
        check(live_request(year_9999), "9999-12-31T23:59:59Z")


def test_a_request_beyond_the_allowed_lateness_is_refused_an_observation_is_not():
    check(live_request(T - 3600 * S), time_us_to_rfc3339(T - 3600 * S))  # exactly the lateness: answered
    with pytest.raises(InvalidRecord, match="request at 2026-12-01T08:59:59Z published 3,601 s later .* "
                                            "--allowed_lateness_s 3600"):
        check(live_request(T - 3601 * S), time_us_to_rfc3339(T - 3601 * S))
    with pytest.raises(InvalidRecord, match="--allowed_lateness_s"):
        check(live_request(0), "1970-01-01T00:00:00Z")
    check(live_observation(0), "1970-01-01T00:00:00Z")  # history: late, still applied


def test_live_parse_stamps_events_with_their_event_time_and_dead_letters_the_rest(flights_spec):
    """Through the Beam wrapper: the element's timestamp is the publish time in, the event time out."""
    good = live_request(T - 5 * S)
    text = event_to_json(good)
    records = [
        (RawRecord("pubsub:1", text, "json", attributes={"event_time": time_us_to_rfc3339(good.time_us)}), T),
        (RawRecord("pubsub:2", text, "json", attributes={"event_time": "not-a-time"}), T),
        (RawRecord("pubsub:3", text, "json", attributes=None), T),
    ]
    with TestPipeline() as pipeline:
        parsed = (pipeline
                  | beam.Create(records)
                  | beam.MapTuple(lambda record, publish_us: beam.window.TimestampedValue(record, publish_us / 1e6))
                  | ParseEvents(flights_spec, live=LIVE))
        stamped = parsed["events"] | beam.Map(
            lambda event, ts=beam.DoFn.TimestampParam: (event.event_id, ts.micros))
        assert_that(stamped, equal_to([(good.event_id, good.time_us)]), label="stamped at event time")
        assert_that(parsed[DEAD_LETTERS] | beam.Map(lambda d: (d.source, d.raw == text, d.reason.split(":")[0])),
                    equal_to([("pubsub:2", True, "event_time"), ("pubsub:3", True, "event_time")]), label="dead")


# --- Fuzz: whatever a producer sends, the live parse returns events or one dead letter, and never raises. ---

_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["2026-12-01T10:00:00Z", "1970-01-01T00:00:00Z",
                                                         "9999-12-31T23:59:59Z", "not-a-time", "1764583200000",
                                                         "-1", "2026-02-30T00:00:00Z", "2026-12-01T10:00:00+25:00"]))
_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                   _TEXT, st.lists(st.integers(), max_size=2))
_FIELDS = ("carrier", "origin", "dest", "distance", "hour", "minute", "month", "day_of_week", "dep_delay")


@st.composite
def messages(draw):
    """A payload (a flights event with any of its envelope or fields spoiled, or any text) and its attributes."""
    time_us = draw(st.integers(rfc3339_to_time_us("0001-01-01T00:00:00Z"), rfc3339_to_time_us("9999-12-31T23:59:59Z")))
    if draw(st.booleans()):
        body = {"event_id": draw(st.one_of(st.just("20261201-UA1545-EWR"), _VALUE)),
                "role": draw(st.sampled_from(["request", "observation", "other", ""])),
                "event_time": draw(st.one_of(st.just(time_us_to_rfc3339(time_us)), _VALUE))}
        body.update(live_request().fields if body["role"] != "observation" else live_observation().fields)
        for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=3)):
            body[name] = draw(_VALUE)
        try:
            text = json.dumps(body)
        except ValueError:
            text = repr(body)
    else:
        text = draw(st.text(max_size=60))
    attributes = draw(st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["event_time", "event_id", "x"]), _TEXT, max_size=3),
        st.just({"event_time": time_us_to_rfc3339(time_us)}),
        st.just({"event_time": str(time_us // 1000)})))
    publish_us = draw(st.one_of(st.just(time_us), st.integers(0, 2 * T)))
    return RawRecord("pubsub:fuzz", text, "json", attributes=attributes), publish_us


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_live_parse_never_raises_and_every_event_it_accepts_is_within_bounds(flights_spec, message):
    record, publish_us = message
    events, dead = parse_or_dead_letter(RecordParser(flights_spec), record, publish_us, LIVE)
    assert (dead is None) != (not events)  # events, or one dead letter: never both, never neither
    if dead is not None:
        assert dead.reason and dead.raw == record.text and dead.stage == "parse"
        assert dead.attributes == record.attributes
        return
    for event in events:
        assert attribute_time_us(record.attributes, "event_time") // 1000 == event.time_us // 1000
        assert event.time_us - publish_us <= BOUNDS.max_future_s * S
        if event.role == "request":
            assert publish_us - event.time_us <= BOUNDS.allowed_lateness_s * S
