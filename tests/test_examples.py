"""tf.Example encoding: what goes in comes back out of tf.io.parse_example."""

import copy

import numpy as np
import pytest

from tests.conftest import request
from transforms.events import Event
from transforms.examples import example_columns, parse_feature_spec, rows_to_record_batch
from transforms.feature_layout import FeatureRow
from transforms.point_in_time import empty_value
from transforms.spec import length_name, load_spec, spec_from_dict

tf = pytest.importorskip("tensorflow")
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder  # noqa: E402

LAST3 = "tailnum_dep_delay_last3_24h"


def _encode(spec, rows, with_label=True):
    return RecordBatchToExamplesEncoder().encode(rows_to_record_batch(spec, rows, with_label))


def _flights_features(count=0.0, mean_1h=None, max_1h=None, mean_3h=None, carrier_3h=None, last=None, since=None,
                      last3=None, route=None, dest=None, std=None) -> tuple:
    """The flights spec's 11 features, in spec order."""
    return (count, mean_1h, max_1h, mean_3h, carrier_3h, last, since, last3, route, dest, std)


def test_layout_follows_the_spec(flights_spec):
    columns = example_columns(flights_spec)
    assert [c.name for c in columns] == [
        "event_id", "carrier", "origin", "dest", "distance", "hour", "minute", "month", "day_of_week",
        "tailnum",  # an optional string: no flag (left out when missing); in the examples, though no model input
        "origin_departures_1h",  # a count: 0 on an empty window, its key always there: no flag
        "origin_dep_delay_mean_1h", "origin_dep_delay_mean_1h_present",
        "origin_dep_delay_max_1h", "origin_dep_delay_max_1h_present",
        "origin_dep_delay_mean_3h", "origin_dep_delay_mean_3h_present",
        "carrier_dep_delay_mean_3h", "carrier_dep_delay_mean_3h_present",
        "tailnum_last_dep_delay_24h", "tailnum_last_dep_delay_24h_present",
        "tailnum_seconds_since_last_24h", "tailnum_seconds_since_last_24h_present",
        # last_k: its k values, how many are real, and (the tail number may be missing) a flag
        LAST3, f"{LAST3}_length", f"{LAST3}_present",
        "route_dep_delay_mean_24h", "route_dep_delay_mean_24h_present",
        "dest_dep_delay_mean_3h", "dest_dep_delay_mean_3h_present",
        "origin_dep_delay_std_3h", "origin_dep_delay_std_3h_present",
        "dep_delay"]
    by_name = {c.name: c for c in columns}
    assert (by_name[LAST3].dtype, by_name[LAST3].role, by_name[LAST3].size) == ("float32", "sequence", 3)
    assert (by_name[f"{LAST3}_length"].dtype, by_name[f"{LAST3}_length"].role) == ("int64", "length")
    assert by_name["origin_departures_1h"].dtype == "int64" and by_name["tailnum"].always_present is False
    assert all(c.size == 1 for c in columns if c.name != LAST3)


def test_round_trip_with_presence_flags(flights_spec):
    rows = [
        FeatureRow(request("20130101-UA1-EWR", 0, label=12.0, tailnum="N14228"),
                   _flights_features(3.0, 4.5, 9.0, 1.25, -2.0, 7.0, 1800.0, (7.0, 3.0), 5.5, 6.0, 2.0)),
        FeatureRow(request("20130101-AA2-JFK", 0, origin="JFK", carrier="AA", label=-3.0),
                   _flights_features(0.0, carrier_3h=7.0)),  # no tail number: its features missing
    ]
    parsed = tf.io.parse_example(_encode(flights_spec, rows), parse_feature_spec(flights_spec))
    assert parsed["event_id"].numpy().tolist() == [b"20130101-UA1-EWR", b"20130101-AA2-JFK"]
    assert parsed["origin"].numpy().tolist() == [b"EWR", b"JFK"]
    assert parsed["tailnum"].numpy().tolist() == [b"N14228", b""]  # left out, read with the default
    assert parsed["distance"].dtype == tf.float32 and parsed["hour"].dtype == tf.int64
    assert parsed["origin_departures_1h"].numpy().tolist() == [3, 0]
    assert parsed["origin_dep_delay_mean_1h"].numpy().tolist() == [4.5, 0.0]
    assert parsed["origin_dep_delay_mean_1h_present"].numpy().tolist() == [1, 0]
    assert parsed["origin_dep_delay_mean_3h"].numpy().tolist() == [1.25, 0.0]
    assert parsed["carrier_dep_delay_mean_3h_present"].numpy().tolist() == [1, 1]
    assert parsed["tailnum_seconds_since_last_24h"].numpy().tolist() == [1800.0, 0.0]
    assert parsed[LAST3].shape == (2, 3) and parsed[LAST3].numpy().tolist() == [[7.0, 3.0, 0.0], [0.0, 0.0, 0.0]]
    assert parsed[f"{LAST3}_length"].numpy().tolist() == [2, 0]
    assert parsed[f"{LAST3}_present"].numpy().tolist() == [1, 0]
    assert parsed["origin_dep_delay_std_3h"].numpy().tolist() == [2.0, 0.0]
    np.testing.assert_array_equal(parsed["dep_delay"].numpy(), np.float32([12.0, -3.0]))


def test_last_k_is_padded_to_k_with_its_length_and_its_flag(flights_spec):
    """k = 3 values, newest first, 0-padded. With the key (a tail number): present 1, even on an empty window
    (length 0); without it: present 0, length 0, zeros."""
    rows = [
        FeatureRow(request("20130101-UA1-EWR", 0, tailnum="N1"), _flights_features(last3=(1.5, -2.0, 3.25))),
        FeatureRow(request("20130101-UA2-EWR", 0, tailnum="N2"), _flights_features(last3=(1.1,))),
        FeatureRow(request("20130101-UA3-EWR", 0, tailnum="N3"), _flights_features(last3=())),  # empty window
        FeatureRow(request("20130101-UA4-EWR", 0), _flights_features(last3=None)),  # no key value
    ]
    serialized = _encode(flights_spec, rows, with_label=False)
    parsed = tf.io.parse_example(serialized, parse_feature_spec(flights_spec, with_label=False))
    assert parsed[LAST3].numpy().tolist() == [[1.5, -2.0, 3.25], [float(np.float32(1.1)), 0.0, 0.0],
                                              [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert parsed[f"{LAST3}_length"].numpy().tolist() == [3, 1, 0, 0]
    assert parsed[f"{LAST3}_present"].numpy().tolist() == [1, 1, 1, 0]
    # Exactly k floats in every example, the padding included.
    for example in serialized:
        feature = tf.train.Example.FromString(example).features.feature
        assert len(feature[LAST3].float_list.value) == 3 and len(feature[f"{LAST3}_length"].int64_list.value) == 1


def _with_features(spec, *features):
    document = copy.deepcopy(spec.to_document())
    document["windowed_features"] += list(features)
    return spec_from_dict(document)


def test_count_distinct_is_an_int64_like_count_with_a_flag_only_for_an_optional_key(flights_spec):
    spec = _with_features(
        flights_spec,
        {"name": "carrier_dests_3h", "key": "carrier", "aggregate": "count_distinct", "field": "dest", "window": "3h"},
        {"name": "tailnum_dests_24h", "key": "tailnum", "aggregate": "count_distinct", "field": "dest",
         "window": "24h"})
    columns = {c.name: c for c in example_columns(spec)}
    assert (columns["carrier_dests_3h"].dtype, columns["carrier_dests_3h"].role) == ("int64", "windowed")
    assert "carrier_dests_3h_present" not in columns  # 0 on an empty window, and every request has a carrier
    assert columns["tailnum_dests_24h"].dtype == "int64" and "tailnum_dests_24h_present" in columns
    rows = [FeatureRow(request("20130101-UA1-EWR", 0, tailnum="N1"), _flights_features() + (3.0, 2.0)),
            FeatureRow(request("20130101-UA2-EWR", 0, tailnum="N2"), _flights_features() + (0.0, 0.0)),
            FeatureRow(request("20130101-UA3-EWR", 0), _flights_features() + (1.0, None))]  # no tail number
    parsed = tf.io.parse_example(_encode(spec, rows, with_label=False), parse_feature_spec(spec, with_label=False))
    assert parsed["carrier_dests_3h"].dtype == tf.int64
    assert parsed["carrier_dests_3h"].numpy().tolist() == [3, 0, 1]
    assert parsed["tailnum_dests_24h"].numpy().tolist() == [2, 0, 0]
    assert parsed["tailnum_dests_24h_present"].numpy().tolist() == [1, 1, 0]


def test_serving_examples_carry_no_label(flights_spec):
    rows = [FeatureRow(request("20130101-UA1-EWR", 0), _flights_features(1.0, 2.0, 2.0, 2.0, 2.0))]
    (serialized,) = _encode(flights_spec, rows, with_label=False)
    example = tf.train.Example.FromString(serialized)
    assert "dep_delay" not in example.features.feature
    parsed = tf.io.parse_example([serialized], parse_feature_spec(flights_spec, with_label=False))
    assert parsed["origin_dep_delay_max_1h"].numpy().tolist() == [2.0]


def test_an_optional_number_is_0_with_a_flag_when_missing_an_optional_string_is_left_out():
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


@pytest.mark.parametrize("spec_name", ["flights", "chicago_taxi", "flights_weather"])
def test_decoded_examples_are_what_row_values_says_batch_would_serve(spec_name):
    """The served-features log decodes the bytes the model scored; the consistency job compares them with
    row_values of the batch engine's row. Both must agree on every column: float32 values (1.1 is not
    1.1), an empty window's 0 and flag, an optional number's 0 and flag, an optional string's None, a
    sequence's k values (a list) and length, a missing key's flag."""
    from transforms.examples import decode_example, row_values

    spec = load_spec(spec_name)
    sample = {"string": "8", "int": 3, "float": 1.1}
    full = {f.name: sample[f.type] for f in spec.request_fields}
    sparse = {f.name: sample[f.type] for f in spec.request_fields if f.required}
    if spec_name.startswith("flights"):
        full.update(origin="EWR", carrier="UA", dest="ORD", hour=8, minute=0, month=1, day_of_week=1, tailnum="N1")
        sparse = dict(full, tailnum=None)

    def full_value(feature):  # every window holds something: a sequence of 2 (fewer than k) values
        return (1.1, -2.5) if feature.rule.sequence else 1.1

    def sparse_value(feature):  # empty windows; a feature whose key the request lacks is missing
        return None if any(sparse.get(part) is None for part in feature.key) else empty_value(feature.aggregate)

    rows = [FeatureRow(Event("a", "request", 1, full), tuple(full_value(f) for f in spec.windowed_features)),
            FeatureRow(Event("b", "request", 2, sparse), tuple(sparse_value(f) for f in spec.windowed_features))]
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
    for sequence in (f for f in spec.windowed_features if f.rule.sequence):
        assert first[sequence.name] == [float(np.float32(1.1)), -2.5] + [0.0] * (sequence.k - 2)
        assert (first[length_name(sequence.name)], first[sequence.name + "_present"]) == (2, 1)
        # The flights requests of the sparse row lack the tail number: no value, zeros, length 0.
        assert second[sequence.name] == [0.0] * sequence.k
        assert (second[length_name(sequence.name)], second[sequence.name + "_present"]) == (0, 0)
    if spec_name == "flights_weather":
        assert first["origin_precip_sum_3h"] == float(np.float32(1.1)) and second["origin_precip_sum_3h_present"] == 0


def test_a_last_k_of_one_value_is_still_a_sequence(flights_spec):
    from transforms.examples import decode_example, row_values

    spec = _with_features(flights_spec, {"name": "tailnum_last1_24h", "key": "tailnum", "aggregate": "last_k",
                                         "field": "dep_delay", "k": 1, "window": "24h"})
    row = FeatureRow(request("20130101-UA1-EWR", 0, tailnum="N1"), _flights_features() + ((2.5,),))
    (serialized,) = _encode(spec, [row], with_label=False)
    assert row_values(spec, row)["tailnum_last1_24h"] == [2.5]
    assert decode_example(spec, serialized)["tailnum_last1_24h"] == [2.5]
    assert parse_feature_spec(spec)["tailnum_last1_24h"].shape == [1]


def _reference_record_batch(spec, rows, with_label=True):
    """rows_to_record_batch as it was, value by value in Python: what the fast one must encode byte for byte."""
    import pyarrow as pa

    from transforms.spec import LENGTH_SUFFIX, PRESENCE_SUFFIX

    arrow = {"bytes": pa.binary(), "int64": pa.int64(), "float32": pa.float32()}

    def sequence_column(values, size):
        flat = np.zeros(len(values) * size, dtype=np.float32)
        for row, sequence in enumerate(values):
            if sequence:
                flat[row * size:row * size + len(sequence)] = sequence
        offsets = np.arange(0, len(values) * size + 1, size, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    def list_column(values, dtype):
        valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum(valid, out=offsets[1:])
        present = values if valid.all() else [v for v in values if v is not None]
        if dtype == "bytes":
            present = [v.encode() if isinstance(v, str) else v for v in present]
        mask = None if valid.all() else pa.array(~valid)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(present, type=arrow[dtype]), mask=mask)

    arrays, names = [], []
    slots = {f.name: i for i, f in enumerate(spec.windowed_features)}
    flagged = {f.name for f in spec.request_fields if f.has_presence}
    for column in example_columns(spec):
        if column.role == "label" and not with_label:
            continue
        if column.role == "id":
            values = [row.event.event_id for row in rows]
        elif column.role in ("static", "label"):
            values = [row.event.fields.get(column.name) for row in rows]
            if column.name in flagged:
                values = [0 if v is None else v for v in values]
        elif column.role == "static_presence":
            field = column.name.removesuffix(PRESENCE_SUFFIX)
            values = [0 if row.event.fields.get(field) is None else 1 for row in rows]
        elif column.role == "presence":
            slot = slots[column.name.removesuffix(PRESENCE_SUFFIX)]
            values = [0 if row.features[slot] is None else 1 for row in rows]
        elif column.role == "sequence":
            arrays.append(sequence_column([row.features[slots[column.name]] for row in rows], column.size))
            names.append(column.name)
            continue
        elif column.role == "length":
            slot = slots[column.name.removesuffix(LENGTH_SUFFIX)]
            values = [len(row.features[slot] or ()) for row in rows]
        else:
            values = [0 if v is None else v for v in (row.features[slots[column.name]] for row in rows)]
            if column.dtype == "int64":
                values = [int(v) for v in values]
        arrays.append(list_column(values, column.dtype))
        names.append(column.name)
    return pa.RecordBatch.from_arrays(arrays, names)


def _feature_rows(spec):
    """Random FeatureRows of a spec: None values, missing optional fields and label, empty and full last_k,
    -0.0, NaN, infinities, float32 overflow and underflow, non-ASCII strings."""
    from hypothesis import strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
    floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.1, 1e-45, 1e-300, 3.4028235e38, 3.5e38, -1e300]))
    by_type = {"string": text, "int": st.integers(-2**63, 2**63 - 1), "float": floats}
    whole = st.integers(-10**15, 10**15).map(float) | st.floats(-1e15, 1e15)  # int() truncates any of them

    def value(strategy, absent_ok):  # absent_ok: a missing key, beside None
        return st.one_of(st.none(), strategy, st.just(_ABSENT) if absent_ok else st.nothing())

    fields = {f.name: value(by_type[f.type], not f.required) for f in spec.request_fields}
    fields[spec.label.name] = value(floats, True)
    features = [st.none() | (st.lists(floats, max_size=f.k).map(tuple) if f.rule.sequence
                             else whole if f.rule.integer else floats) for f in spec.windowed_features]
    event = st.builds(lambda event_id, values: Event(event_id, "request", 0, {
        k: v for k, v in values.items() if v is not _ABSENT}), text, st.fixed_dictionaries(fields))
    return st.lists(st.builds(FeatureRow, event, st.tuples(*features)), max_size=12)


_ABSENT = object()


@pytest.mark.parametrize("spec_name", ["flights", "chicago_taxi"])
def test_record_batches_encode_as_the_row_by_row_reference_does(spec_name):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    spec = load_spec(spec_name)
    encoder = RecordBatchToExamplesEncoder()

    def canonical(batch):  # tfx-bsl writes an example's features in no fixed order, even encoding one batch twice
        return [tf.train.Example.FromString(example).SerializeToString(deterministic=True)
                for example in encoder.encode(batch)]

    @settings(max_examples=50, deadline=None)
    @given(_feature_rows(spec), st.booleans())
    def check(rows, with_label):
        with np.errstate(over="ignore"):  # a float beyond float32's range: inf, both ways
            batch = rows_to_record_batch(spec, rows, with_label)
            reference = _reference_record_batch(spec, rows, with_label)
        assert batch.schema == reference.schema
        assert canonical(batch) == canonical(reference)  # bytes, float32 bits included, up to that order

    check()
