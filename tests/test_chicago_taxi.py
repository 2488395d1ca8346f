"""The chicago_taxi use case: its adapter on rows written by hand, its spec,
and the general pieces it needed (adapters by reference, optional numbers
with a presence flag) checked on it."""

from __future__ import annotations

import csv
import hashlib
import io

import pytest

from beam_app.adapters.chicago_taxi import trip_events
from models.features import model_inputs
from beam_app.adapters import load_adapter
from transforms.events import RawRecord
from transforms.examples import example_columns
from tests.parsing import parse_record
from transforms.read_files import resolve_input
from transforms.spec import load_spec

HEADER = ("pickup_community_area,fare,trip_start_month,trip_start_hour,trip_start_day,trip_start_timestamp,"
          "pickup_latitude,pickup_longitude,dropoff_latitude,dropoff_longitude,trip_miles,pickup_census_tract,"
          "dropoff_census_tract,payment_type,company,trip_seconds,dropoff_community_area,tips")
# 2013-10-01 02:15 (a Tuesday: day 3), Loop centroid -> Near North centroid, 1,380 s.
ROW = ("32,27.05,10,2,3,1380593700,41.884987192,-87.620992913,41.892042136,-87.63186395,2.6,,"
       "17031081500,Cash,Taxi Affiliation Services,1380,8,0.0")


@pytest.fixture(scope="module")
def taxi_spec():
    return load_spec("chicago_taxi")


def _row(text: str = ROW, **changes) -> dict:
    row = dict(zip(HEADER.split(","), next(csv.reader([text]))))
    row.update(changes)
    return row


def _record(row: dict) -> RawRecord:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(row.values())
    return RawRecord("test:2", out.getvalue(), "csv", tuple(row))


def test_a_trip_is_a_request_at_its_start_and_an_observation_at_its_end(taxi_spec):
    request, observation = parse_record(taxi_spec, _record(_row()))
    digest = hashlib.sha256("\x1f".join(ROW.split(",")).encode()).hexdigest()[:10]
    assert request.event_id == observation.event_id == f"20131001T0215-{digest}"
    assert request.time_us == 1_380_593_700_000_000
    assert observation.time_us == request.time_us + 1380 * 1_000_000
    # By hand, flat at this scale: 0.007055 degrees north x 69.093 miles = 0.4874 miles;
    # 0.010871 degrees west x 69.093 x cos(41.889 degrees) = 0.5592 miles; hypotenuse 0.7418.
    distance = request.fields.pop("centroid_distance_miles")
    assert distance == pytest.approx(0.7418, abs=2e-4)
    assert request.fields == {"pickup_community_area": "32", "dropoff_community_area": "8", "trip_start_hour": 2,
                              "trip_start_day": 3, "payment_type": "Cash", "company": "Taxi Affiliation Services",
                              "fare": 27.05}
    assert observation.fields == {"pickup_community_area": "32", "fare": 27.05, "trip_miles": 2.6,
                                  "trip_seconds": 1380}


def test_missing_values_the_spec_allows_stay_missing(taxi_spec):
    request, observation = parse_record(taxi_spec, _record(_row(
        dropoff_latitude="", dropoff_longitude="", dropoff_community_area="", company="", trip_miles="0.0")))
    assert request.fields["centroid_distance_miles"] is None
    assert request.fields["dropoff_community_area"] is None and request.fields["company"] is None
    assert observation.fields["trip_miles"] is None  # the meter's 0: not recorded, not a dead letter


def test_a_sunday_is_day_1_as_in_the_citys_data(taxi_spec):
    (request, _) = parse_record(taxi_spec, _record(_row(trip_start_timestamp="1380420000")))  # 2013-09-29, Sunday
    assert request.fields["trip_start_day"] == 1 and request.fields["trip_start_hour"] == 2


@pytest.mark.parametrize("changes,reason", [
    ({"fare": "0"}, "fare: 0.0 is below the minimum 0.01"),
    ({"fare": "700.07"}, "fare: 700.07 is above the maximum 300"),
    ({"fare": ""}, "fare: missing"),
    ({"trip_seconds": "0"}, "trip_seconds: 0 is below the minimum 1"),
    ({"trip_seconds": "-60"}, "trip_seconds: -60 is below the minimum 1"),
    ({"trip_seconds": ""}, "trip_seconds: missing: the trip has no end to observe"),
    ({"trip_miles": "1710"}, "trip_miles: 1710.0 is above the maximum 500"),
    ({"pickup_community_area": ""}, "pickup_community_area: missing"),
    ({"pickup_community_area": "78"}, "pickup_community_area: not a community area"),
    ({"trip_start_timestamp": "soon"}, "trip_start_timestamp: not an integer"),
    ({"payment_type": " "}, "payment_type: missing"),
])
def test_impossible_trips_are_dead_letters_with_the_reason(taxi_spec, changes, reason):
    with pytest.raises(ValueError, match=reason):
        parse_record(taxi_spec, _record(_row(**changes)))


def test_every_row_of_the_embedded_file_has_its_own_id(taxi_spec):
    adapter = load_adapter(taxi_spec.sources[0].csv_adapter)
    with open(resolve_input(taxi_spec.sources[0].default_input), newline="") as source:
        rows = list(csv.DictReader(source))
    assert len(rows) == 15_002
    ids = [adapter(row)[0].event_id for row in rows if row["trip_seconds"]]
    assert len(set(ids)) == len(ids) == 15_002 - 6


def test_the_spec_is_the_contract(taxi_spec):
    assert taxi_spec.sources[0].csv_adapter == "beam_app.adapters.chicago_taxi:trip_events"
    assert load_adapter(taxi_spec.sources[0].csv_adapter) is trip_events
    assert [(f.name, f.aggregate, f.field, f.per, f.window_s // 86400) for f in taxi_spec.windowed_features] == [
        ("pickup_trips_7d", "count", None, None, 7),
        ("pickup_trips_30d", "count", None, None, 30),
        ("pickup_fare_per_mile_7d", "ratio", "fare", "trip_miles", 7),
        ("pickup_fare_per_mile_30d", "ratio", "fare", "trip_miles", 30),
        ("pickup_fare_mean_30d", "mean", "fare", None, 30),
        ("pickup_trip_seconds_mean_30d", "mean", "trip_seconds", None, 30),
    ]
    assert taxi_spec.label.name == "fare" and taxi_spec.rate_baseline == "centroid_distance_miles"
    columns = [c.name for c in example_columns(taxi_spec)]
    assert columns.index("centroid_distance_miles_present") == columns.index("centroid_distance_miles") + 1
    # An optional string is simply left out when missing; only numbers need a flag.
    assert "company_present" not in columns


def test_model_inputs_take_the_optional_numbers_flag_even_without_windows(taxi_spec):
    inputs = model_inputs(taxi_spec, use_windowed=False)
    assert inputs.numeric == ("centroid_distance_miles",)
    assert inputs.presence == ("centroid_distance_miles_present",)
    assert inputs.ordinal == {"trip_start_hour": (0, 23), "trip_start_day": (1, 7)}
    assert inputs.crosses == (("pickup_community_area", "trip_start_hour"), ("pickup_community_area", "trip_start_day"))
    assert "pickup_fare_per_mile_30d_present" in model_inputs(taxi_spec).presence


@pytest.mark.parametrize("reference,message", [
    ("beam_app.adapters.chicago_taxi", "expected 'package.module:function'"),
    ("beam_app.adapters.no_such_module:f", "cannot import beam_app.adapters.no_such_module"),
    ("beam_app.adapters.chicago_taxi:no_such_function", "has no function 'no_such_function'"),
])
def test_a_bad_adapter_reference_says_what_is_wrong(reference, message):
    with pytest.raises(ValueError, match=message):
        load_adapter(reference)
