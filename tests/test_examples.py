"""tf.Example encoding: what goes in comes back out of tf.io.parse_example."""

import numpy as np
import pytest

from tests.conftest import request
from transforms.events import Event
from transforms.examples import example_columns, parse_feature_spec, rows_to_record_batch
from transforms.windowed_features import FeatureRow

tf = pytest.importorskip("tensorflow")
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder  # noqa: E402


def _encode(spec, rows, with_label=True):
    return RecordBatchToExamplesEncoder().encode(rows_to_record_batch(spec, rows, with_label))


def test_layout_follows_the_spec(flights_spec):
    names = [c.name for c in example_columns(flights_spec)]
    assert names == [
        "event_id", "carrier", "origin", "dest", "distance", "hour", "minute", "month", "day_of_week",
        "origin_departures_1h",
        "origin_dep_delay_mean_1h", "origin_dep_delay_mean_1h_present",
        "origin_dep_delay_max_1h", "origin_dep_delay_max_1h_present",
        "origin_dep_delay_mean_3h", "origin_dep_delay_mean_3h_present",
        "carrier_dep_delay_mean_3h", "carrier_dep_delay_mean_3h_present",
        "dep_delay"]


def test_round_trip_with_presence_flags(flights_spec):
    rows = [
        FeatureRow(request("20130101-UA1-EWR", 0, label=12.0), (3.0, 4.5, 9.0, 1.25, -2.0)),
        FeatureRow(request("20130101-AA2-JFK", 0, origin="JFK", carrier="AA", label=-3.0),
                   (0.0, None, None, None, 7.0)),
    ]
    parsed = tf.io.parse_example(_encode(flights_spec, rows), parse_feature_spec(flights_spec))
    assert parsed["event_id"].numpy().tolist() == [b"20130101-UA1-EWR", b"20130101-AA2-JFK"]
    assert parsed["origin"].numpy().tolist() == [b"EWR", b"JFK"]
    assert parsed["distance"].dtype == tf.float32 and parsed["hour"].dtype == tf.int64
    assert parsed["origin_departures_1h"].numpy().tolist() == [3, 0]
    assert parsed["origin_dep_delay_mean_1h"].numpy().tolist() == [4.5, 0.0]
    assert parsed["origin_dep_delay_mean_1h_present"].numpy().tolist() == [1, 0]
    assert parsed["origin_dep_delay_mean_3h"].numpy().tolist() == [1.25, 0.0]
    assert parsed["carrier_dep_delay_mean_3h_present"].numpy().tolist() == [1, 1]
    np.testing.assert_array_equal(parsed["dep_delay"].numpy(), np.float32([12.0, -3.0]))


def test_serving_examples_carry_no_label(flights_spec):
    rows = [FeatureRow(request("20130101-UA1-EWR", 0), (1.0, 2.0, 2.0, 2.0, 2.0))]
    (serialized,) = _encode(flights_spec, rows, with_label=False)
    example = tf.train.Example.FromString(serialized)
    assert "dep_delay" not in example.features.feature
    parsed = tf.io.parse_example([serialized], parse_feature_spec(flights_spec, with_label=False))
    assert parsed["origin_dep_delay_max_1h"].numpy().tolist() == [2.0]


def test_an_optional_number_is_0_with_a_flag_when_missing_an_optional_string_is_left_out():
    from transforms.events import Event
    from transforms.spec import load_spec

    spec = load_spec("chicago_taxi")
    fields = {"pickup_community_area": "8", "dropoff_community_area": "32", "trip_start_hour": 9, "trip_start_day": 2,
              "payment_type": "Cash", "company": "Flash Cab", "centroid_distance_miles": 1.5, "fare": 9.25}
    missing = dict(fields, dropoff_community_area=None, company=None, centroid_distance_miles=None)
    rows = [FeatureRow(Event("a", "request", 0, fields), (0.0,) * 6),
            FeatureRow(Event("b", "request", 0, missing), (0.0,) * 6)]
    serialized = _encode(spec, rows)
    parsed = tf.io.parse_example(serialized, parse_feature_spec(spec))
    assert parsed["centroid_distance_miles"].numpy().tolist() == [1.5, 0.0]
    assert parsed["centroid_distance_miles_present"].numpy().tolist() == [1, 0]
    assert parsed["company"].numpy().tolist() == [b"Flash Cab", b""]
    written = tf.train.Example.FromString(serialized[1]).features.feature
    # tfx-bsl writes a missing value as an empty list, which readers take as absent.
    assert not written["company"].bytes_list.value and not written["dropoff_community_area"].bytes_list.value
    assert list(written["centroid_distance_miles"].float_list.value) == [0.0]


@pytest.mark.parametrize("spec_name", ["flights", "chicago_taxi"])
def test_decoded_examples_are_what_row_values_says_batch_would_serve(spec_name):
    """The served-features log decodes the bytes the model scored; the consistency job compares them with
    row_values of the batch engine's row. Both must agree on every column: float32 values (1.1 is not
    1.1), an empty window's 0 and flag, an optional number's 0 and flag, an optional string's None."""
    from transforms.examples import decode_example, row_values
    from transforms.spec import load_spec

    spec = load_spec(spec_name)
    sample = {"string": "8", "int": 3, "float": 1.1}
    full = {f.name: sample[f.type] for f in spec.request_fields}
    sparse = {f.name: sample[f.type] for f in spec.request_fields if f.required}
    if spec_name == "flights":
        full.update(origin="EWR", carrier="UA", dest="ORD", hour=8, minute=0, month=1, day_of_week=1)
        sparse = full
    windows = len(spec.windowed_features)
    rows = [FeatureRow(Event("a", "request", 1, full), tuple(1.1 for _ in range(windows))),
            FeatureRow(Event("b", "request", 2, sparse), tuple(0.0 if f.aggregate == "count" else None
                                                              for f in spec.windowed_features))]
    for row, serialized in zip(rows, _encode(spec, rows, with_label=False)):
        decoded = decode_example(spec, serialized)
        assert decoded == row_values(spec, row)
        assert set(decoded) == {c.name for c in example_columns(spec)} - {"event_id", spec.label.name}
    first = decode_example(spec, _encode(spec, rows[:1], with_label=False)[0])
    feature = next(f for f in spec.windowed_features if f.aggregate != "count")
    assert first[feature.name] == float(np.float32(1.1)) != 1.1
    second = row_values(spec, rows[1])
    assert (second[feature.name], second[feature.name + "_present"]) == (0.0, 0)
    for field in spec.request_fields:
        if not field.required:
            assert second[field.name] == (None if field.type == "string" else 0)
