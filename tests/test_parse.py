"""Parsing: the flights adapter, NDJSON events, and dead letters with reasons."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_app.adapters import load_adapters
from beam_app.common.job_report import counters as job_counters
from tests.parsing import parse_record, validate_event
from transforms import counters
from transforms.events import DeadLetter, Event, InvalidRecord, RawRecord, event_to_json, rfc3339_to_time_us
from transforms.parse import DEAD_LETTERS, ParseEvents, RecordParser
from transforms.spec import load_spec

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
                              "minute": 15, "month": 1, "day_of_week": 1, "tailnum": "N14228",
                              "dep_delay": 2.0}  # a Tuesday
    assert observation.fields == {"carrier": "UA", "origin": "EWR", "dest": "IAH", "tailnum": "N14228",
                                  "dep_delay": 2.0}


def test_a_flight_without_a_tail_number_has_none_on_both_events(flights_spec):
    values = ROW.split(",")
    values[11] = "NA"  # 2,512 flights of 2013 have no tailnum: the key is optional on both sides
    request, observation = parse_record(flights_spec, csv_record(",".join(values)))
    assert request.fields["tailnum"] is None and observation.fields["tailnum"] is None


def test_cancelled_flight_is_a_request_without_label_and_no_observation(flights_spec):
    (request,) = parse_record(flights_spec, csv_record(CANCELLED))
    assert request.role == "request" and request.fields["dep_delay"] is None
    assert request.fields["tailnum"] == "N18120"


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
            '"carrier":"UA","origin":"EWR","dest":"IAH","dep_delay":2,"note":"ignored"}')
    (event,) = parse_record(flights_spec, RawRecord("x:1", text, "json"))
    assert event.fields == {"carrier": "UA", "origin": "EWR", "dest": "IAH", "tailnum": None, "dep_delay": 2.0}
    assert isinstance(event.fields["dep_delay"], float)


@pytest.mark.parametrize("text,reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"event_id":"20130101-UA1-EWR","role":"request"}', "missing event_time"),
    ('{"event_id":"20130101-UA1-EWR","role":"guess","event_time":"2013-01-01T10:17:00Z"}', "role"),
    ('{"event_id":"x","role":"observation","event_time":"2013-01-01T10:17:00Z"}', "event_id: 'x' does not match"),
    ('{"event_id":"20130101-UA1-EWR","role":"observation","event_time":"2013-01-01 10:17"}', "UTC offset"),
    ('{"event_id":"20130101-UA1-EWR","role":"observation","event_time":"2013-01-01T10:17:00Z",'
     '"carrier":"UA","origin":"EWR","dest":"ORD","dep_delay":"late"}', "dep_delay: expected a number"),
    ('{"event_id":"20130101-UA1-EWR","role":"observation","event_time":"2013-01-01T10:17:00Z",'
     '"carrier":"UA","origin":"EWR","dep_delay":3}', "dest: missing (required on observation events)"),
    ('{"event_id":"20130101T06-EWR","role":"weather","event_time":"2013-01-01T06:00:00Z","origin":"EWR"}',
     "role: expected one of ['request', 'observation'], got 'weather'"),  # the flights spec has no weather
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
        parsed = pipeline | beam.Create(records) | ParseEvents(flights_spec, adapters=load_adapters(flights_spec))
        assert_that(parsed["events"] | beam.Map(lambda e: (e.event_id, e.role)), equal_to([
            ("20130101-UA1545-EWR", "request"), ("20130101-UA1545-EWR", "observation"),
            ("20130101-EV4308-EWR", "request")]), label="events")
        assert_that(parsed[DEAD_LETTERS], equal_to([DeadLetter(
            "flights.csv:4", bad, "origin: unknown value 'BOS'; allowed: ['EWR', 'JFK', 'LGA']", "parse")]),
            label="dead letters")
    counts = job_counters(pipeline.result)
    assert (counters.RECORDS_READ.of(counts), counters.RECORDS_OK.of(counts),
            counters.PARSE_DEAD_LETTERS.of(counts)) == (3, 2, 1)
    assert counters.parsed("request").of(counts) == 2 and counters.parsed("observation").of(counts) == 1




# ---- flights_weather: a second source (weather.csv) and a second kind of observation (weather) ----

WEATHER_HEADER = tuple("origin,year,month,day,hour,temp,dewp,humid,wind_dir,wind_speed,wind_gust,precip,pressure,"
                       "visib,time_hour".split(","))
WEATHER_ROW = "EWR,2013,1,1,1,39.02,26.06,59.37,270,10.357019999999999,NA,0,1012,10,2013-01-01T06:00:00Z"


@pytest.fixture(scope="module")
def weather_spec():
    return load_spec("flights_weather")


def weather_record(text, line=2):
    return RawRecord(f"weather.csv:{line}", text, "csv", WEATHER_HEADER, source_name="weather")


def test_a_weather_row_is_one_weather_observation_at_its_hour(weather_spec):
    (event,) = parse_record(weather_spec, weather_record(WEATHER_ROW))
    # id YYYYMMDDTHH-<origin> of time_hour (UTC), the observation at time_hour itself
    assert (event.event_id, event.role) == ("20130101T06-EWR", "weather")
    assert event.time_us == rfc3339_to_time_us("2013-01-01T06:00:00Z")
    assert event.fields == {"origin": "EWR", "visib": 10.0, "precip": 0.0, "wind_speed": 10.357019999999999}


def test_weather_na_values_are_missing_and_the_id_is_of_the_utc_hour(weather_spec):
    values = WEATHER_ROW.split(",")
    values[9], values[11], values[13] = "NA", "NA", "NA"  # wind_speed, precip, visib: all optional
    values[14] = "2013-01-01T01:00:00-05:00"  # the same instant as 06:00Z
    (event,) = parse_record(weather_spec, weather_record(",".join(values)))
    assert event.fields == {"origin": "EWR", "visib": None, "precip": None, "wind_speed": None}
    assert event.event_id == "20130101T06-EWR" and event.time_us == rfc3339_to_time_us("2013-01-01T06:00:00Z")


@pytest.mark.parametrize("column,value,reason", [
    (9, "1048.36058", "wind_speed: 1048.36058 is above the maximum 100"),  # the source's one impossible wind
    (13, "11", "visib: 11.0 is above the maximum 10"),
    (11, "-1", "precip: -1.0 is below the minimum 0"),
    (0, "BOS", "origin: unknown value 'BOS'"),
    (9, "calm", "wind_speed: not a number"),
    (14, "2013-01-01T06:00:00", "time_hour: needs a UTC offset"),
])
def test_bad_weather_rows_say_why(weather_spec, column, value, reason):
    values = WEATHER_ROW.split(",")
    values[column] = value
    with pytest.raises(InvalidRecord) as err:
        parse_record(weather_spec, weather_record(",".join(values)))
    assert reason in str(err.value)


def test_a_json_weather_event_is_checked_against_the_weather_kind(weather_spec):
    text = ('{"event_id":"20130101T06-EWR","role":"weather","event_time":"2013-01-01T06:00:00Z","origin":"EWR",'
            '"visib":3,"wind_speed":12.5,"temp":39.02}')
    (event,) = parse_record(weather_spec, RawRecord("x:1", text, "json"))
    assert event.fields == {"origin": "EWR", "visib": 3.0, "precip": None, "wind_speed": 12.5}  # temp dropped
    assert isinstance(event.fields["visib"], float)
    # Each kind has its own event id pattern: a flight's id is no weather id, and a weather id no flight's.
    with pytest.raises(InvalidRecord, match=r"event_id: '20130101-UA1-EWR' does not match"):
        parse_record(weather_spec, RawRecord("x:2", text.replace("20130101T06-EWR", "20130101-UA1-EWR"), "json"))
    departure = ('{"event_id":"20130101T06-EWR","role":"observation","event_time":"2013-01-01T06:00:00Z",'
                 '"carrier":"UA","origin":"EWR","dest":"ORD","dep_delay":1}')
    with pytest.raises(InvalidRecord, match=r"event_id: '20130101T06-EWR' does not match"):
        parse_record(weather_spec, RawRecord("x:3", departure, "json"))
    with pytest.raises(InvalidRecord, match="wind_speed: 1048.0 is above the maximum 100"):
        parse_record(weather_spec, RawRecord("x:4", text.replace("12.5", "1048"), "json"))


def test_a_role_the_spec_does_not_have_lists_its_roles(flights_spec, weather_spec):
    event = Event("20130101T06-EWR", "weather", 0, {"origin": "EWR"})
    with pytest.raises(InvalidRecord, match=r"role: expected one of \['request', 'observation'\], got 'weather'"):
        validate_event(flights_spec, event)
    assert validate_event(weather_spec, event).fields == {"origin": "EWR", "visib": None, "precip": None,
                                                          "wind_speed": None}
    with pytest.raises(InvalidRecord, match=r"\['request', 'observation', 'weather'\], got 'departure'"):
        validate_event(weather_spec, event._replace(role="departure"))


def test_a_csv_record_is_read_by_its_sources_adapter(flights_spec, weather_spec):
    # No source name: the spec's first source (flights); a weather row there is not a flight.
    request, _ = parse_record(weather_spec, csv_record(ROW))
    assert request.event_id == "20130101-UA1545-EWR"
    with pytest.raises(InvalidRecord, match="carrier: missing"):
        parse_record(weather_spec, RawRecord("weather.csv:2", WEATHER_ROW, "csv", WEATHER_HEADER))
    # A source the spec has no adapter for is named in the reason.
    with pytest.raises(InvalidRecord,
                       match=r"no CSV adapter for source 'weather' \(the spec's sources: \['flights'\]\)"):
        parse_record(flights_spec, weather_record(WEATHER_ROW))
    with pytest.raises(InvalidRecord, match="no CSV adapter for source 'flights'"):
        RecordParser(flights_spec)(csv_record(ROW))  # no adapters given: NDJSON only


def test_parse_events_counts_each_kind_by_its_name(weather_spec):
    records = [csv_record(ROW, 2), weather_record(WEATHER_ROW, 2),
               weather_record(WEATHER_ROW.replace("10.357019999999999", "1048.36058"), 3)]
    with TestPipeline() as pipeline:
        parsed = pipeline | beam.Create(records) | ParseEvents(weather_spec, adapters=load_adapters(weather_spec))
        assert_that(parsed["events"] | beam.Map(lambda e: (e.event_id, e.role)), equal_to([
            ("20130101-UA1545-EWR", "request"), ("20130101-UA1545-EWR", "observation"),
            ("20130101T06-EWR", "weather")]), label="events")
        assert_that(parsed[DEAD_LETTERS] | beam.Map(lambda d: (d.source, d.reason)), equal_to([
            ("weather.csv:3", "wind_speed: 1048.36058 is above the maximum 100")]), label="dead letters")
    counts = job_counters(pipeline.result)
    assert (counters.RECORDS_READ.of(counts), counters.RECORDS_OK.of(counts),
            counters.PARSE_DEAD_LETTERS.of(counts)) == (3, 2, 1)
    assert tuple(counters.parsed(role).of(counts) for role in ("request", "observation", "weather")) == (1, 1, 1)
