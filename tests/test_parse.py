"""Parsing: the flights adapter, NDJSON events, and dead letters with reasons."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.events import DeadLetter, Event, InvalidRecord, RawRecord, event_to_json, rfc3339_to_time_us
from transforms.parse import DEAD_LETTERS, ParseEvents, parse_record, validate_event

HEADER = ("year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,carrier,"
          "flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour").split(",")
ROW = "2013,1,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,2013-01-01T10:00:00Z"
CANCELLED = "2013,1,1,NA,1630,NA,NA,1815,NA,EV,4308,N18120,EWR,RDU,NA,416,16,30,2013-01-01T21:00:00Z"


def csv_record(text, line=2):
    return RawRecord(f"flights.csv:{line}", text, "csv", tuple(HEADER))


def test_flights_row_becomes_request_and_observation(flights_spec):
    request, observation = parse_record(flights_spec, csv_record(ROW))
    assert request.event_id == observation.event_id == "20130101-UA1545-EWR"
    # scheduled 10:15 UTC; request one hour before; departure 2 minutes late
    assert request.time_us == rfc3339_to_time_us("2013-01-01T09:15:00Z")
    assert observation.time_us == rfc3339_to_time_us("2013-01-01T10:17:00Z")
    assert request.fields == {"carrier": "UA", "origin": "EWR", "dest": "IAH", "distance": 1400.0, "hour": 5,
                              "minute": 15, "month": 1, "day_of_week": 1, "dep_delay": 2.0}  # a Tuesday
    assert observation.fields == {"carrier": "UA", "origin": "EWR", "dep_delay": 2.0}


def test_cancelled_flight_is_a_request_without_label_and_no_observation(flights_spec):
    (request,) = parse_record(flights_spec, csv_record(CANCELLED))
    assert request.role == "request" and request.fields["dep_delay"] is None


@pytest.mark.parametrize("edit,reason", [
    (lambda v: v.__setitem__(12, "BOS"), "origin: unknown value 'BOS'"),
    (lambda v: v.__setitem__(5, "soon"), "dep_delay: not a number"),
    (lambda v: v.__setitem__(17, "75"), "minute: must be in [0, 59]"),
    (lambda v: v.__setitem__(15, "NA"), "distance: missing"),
    (lambda v: v.__setitem__(9, ""), "carrier: missing"),
    (lambda v: v.__setitem__(18, "yesterday"), "time_hour"),
    (lambda v: v.__setitem__(5, "9999"), "dep_delay: 9999.0 is above the maximum"),
    (lambda v: v.pop(), "expected 19 CSV columns, got 18"),
])
def test_bad_rows_say_why(flights_spec, edit, reason):
    values = ROW.split(",")
    edit(values)
    with pytest.raises(InvalidRecord) as err:
        parse_record(flights_spec, csv_record(",".join(values)))
    assert reason in str(err.value)


def test_ndjson_event_round_trip(flights_spec):
    request, observation = parse_record(flights_spec, csv_record(ROW))
    for event in (request, observation):
        assert parse_record(flights_spec, RawRecord("x:1", event_to_json(event), "json")) == [event]


def test_ndjson_types_are_coerced_and_extra_fields_dropped(flights_spec):
    text = ('{"event_id":"20130101-UA1545-EWR","role":"observation","event_time":"2013-01-01T10:17:00Z",'
            '"carrier":"UA","origin":"EWR","dep_delay":2,"note":"ignored"}')
    (event,) = parse_record(flights_spec, RawRecord("x:1", text, "json"))
    assert event.fields == {"carrier": "UA", "origin": "EWR", "dep_delay": 2.0}
    assert isinstance(event.fields["dep_delay"], float)


@pytest.mark.parametrize("text,reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"event_id":"20130101-UA1-EWR","role":"request"}', "missing event_time"),
    ('{"event_id":"20130101-UA1-EWR","role":"guess","event_time":"2013-01-01T10:17:00Z"}', "role"),
    ('{"event_id":"x","role":"observation","event_time":"2013-01-01T10:17:00Z"}', "event_id: 'x' does not match"),
    ('{"event_id":"20130101-UA1-EWR","role":"observation","event_time":"2013-01-01 10:17"}', "UTC offset"),
    ('{"event_id":"20130101-UA1-EWR","role":"observation","event_time":"2013-01-01T10:17:00Z",'
     '"carrier":"UA","origin":"EWR","dep_delay":"late"}', "dep_delay: expected a number"),
    ('{"event_id":"20130101-UA1-EWR","role":"request","event_time":"2013-01-01T10:17:00Z",'
     '"carrier":"UA","origin":"EWR","dest":"ORD","distance":700,"hour":8.5,"minute":0,"month":1,'
     '"day_of_week":1}', "hour: expected an integer"),
])
def test_bad_ndjson_says_why(flights_spec, text, reason):
    with pytest.raises(InvalidRecord) as err:
        parse_record(flights_spec, RawRecord("x:1", text, "json"))
    assert reason in str(err.value)


def test_undecodable_bytes_are_a_dead_letter_not_a_crash(flights_spec, tmp_path):
    from transforms.read_files import read_records

    path = tmp_path / "flights.csv"
    bad_bytes = ROW.encode().replace(b"IAH", b"I\xffH")  # not UTF-8
    path.write_bytes(",".join(HEADER).encode() + b"\n" + ROW.encode() + b"\n" + bad_bytes + b"\n")
    good, bad = read_records(str(path))
    assert parse_record(flights_spec, good)[0].fields["dest"] == "IAH"
    with pytest.raises(InvalidRecord, match="not valid UTF-8"):
        parse_record(flights_spec, bad)


def test_live_request_needs_no_label(flights_spec):
    event = Event("20130101-UA1545-EWR", "request", 0, {
        "carrier": "UA", "origin": "EWR", "dest": "IAH", "distance": 1400, "hour": 5, "minute": 15,
        "month": 1, "day_of_week": 1})
    assert validate_event(flights_spec, event).fields["dep_delay"] is None


def test_parse_events_routes_and_counts(flights_spec):
    bad = ROW.replace(",EWR,", ",BOS,")
    records = [csv_record(ROW, 2), csv_record(CANCELLED, 3), csv_record(bad, 4)]
    with TestPipeline() as pipeline:
        parsed = pipeline | beam.Create(records) | ParseEvents(flights_spec)
        assert_that(parsed["events"] | beam.Map(lambda e: (e.event_id, e.role)), equal_to([
            ("20130101-UA1545-EWR", "request"), ("20130101-UA1545-EWR", "observation"),
            ("20130101-EV4308-EWR", "request")]), label="events")
        assert_that(parsed[DEAD_LETTERS], equal_to([DeadLetter(
            "flights.csv:4", bad, "origin: unknown value 'BOS'; allowed: ['EWR', 'JFK', 'LGA']", "parse")]),
            label="dead letters")
    counters = {c.key.metric.name: c.committed for c in pipeline.result.metrics().query()["counters"]}
    assert counters["records_read"] == 3 and counters["records_ok"] == 2 and counters["dead_letters"] == 1
    assert counters["requests"] == 2 and counters["observations"] == 1


