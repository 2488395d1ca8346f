"""Training statistics (transforms/feature_stats.py): hand-made rows through the
encoder's RecordBatches, checked against numpy and collections.Counter on the
same values; the sketch's error bound and merge invariance by property; the
Beam transform equal to the pure function."""

from __future__ import annotations

import collections
import json
import logging
import math
import random
from fractions import Fraction

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms import feature_stats as fs
from transforms.events import Event
from transforms.examples import rows_to_record_batch
from transforms.spec import load_spec
from transforms.feature_layout import FeatureRow

ALPHA = fs.RELATIVE_ACCURACY


@pytest.fixture(scope="module")
def taxi_spec():
    # Every kind of column: counts, windowed features that may be missing, optional numbers and strings.
    return load_spec("chicago_taxi")


def _taxi_rows(n: int, seed: int = 7) -> list[FeatureRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        fields = {
            "pickup_community_area": rng.choice(["8", "32", "76", "28"]),
            "dropoff_community_area": None if i % 7 == 0 else rng.choice(["8", "32", "6", "77", "1"]),
            "trip_start_hour": rng.randint(0, 23),
            "trip_start_day": rng.randint(1, 7),
            "payment_type": rng.choice(["Cash", "Credit Card", "Cash", "Cash", "No Charge"]),
            "company": None if i % 3 == 0 else f"company {rng.randint(0, 30)}",
            "centroid_distance_miles": None if i % 5 == 0 else rng.choice([0.0, rng.uniform(0, 30)]),
            "fare": round(rng.uniform(3.25, 80), 2),
        }
        features = (
            float(rng.choice([0, 0, rng.randint(1, 400)])),  # count: empty windows are 0
            float(rng.randint(0, 2000)),
            None if i % 4 == 0 else rng.uniform(1, 12),
            None if i % 9 == 0 else rng.choice([rng.uniform(1, 12), -rng.uniform(0, 1)]),  # negatives too
            None if i < 5 else rng.uniform(5, 40),
            None if i % 11 == 0 else float(rng.randint(60, 3600)),
        )
        rows.append(FeatureRow(Event(f"20150101T0000-{i:010x}", "request", i, fields), features))
    return rows


def _batches(spec, rows, cuts):
    bounds = [0, *cuts, len(rows)]
    return [rows_to_record_batch(spec, rows[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def _expected_values(spec, rows) -> dict:
    """{column: (present values, missing)} from the rows themselves, as the model reads them (float32)."""
    out = {}
    for field in spec.request_fields:
        raw = [row.event.fields[field.name] for row in rows]
        present = [v for v in raw if v is not None]
        if field.type == "float":
            present = [np.float32(v) for v in present]
        out[field.name] = (present, len(raw) - len(present))
    for slot, feature in enumerate(spec.windowed_features):
        raw = [row.features[slot] for row in rows]
        if feature.rule.sequence:
            continue  # k values per example: not described in stats.json
        if feature.rule.integer and not feature.has_presence:
            out[feature.name] = ([int(v) for v in raw], 0)
        elif feature.rule.integer:  # a count whose key may be missing: missing by its flag
            present = [int(v) for v in raw if v is not None]
            out[feature.name] = (present, len(raw) - len(present))
        else:
            present = [np.float32(v) for v in raw if v is not None]
            out[feature.name] = (present, len(raw) - len(present))
    out[spec.label.name] = ([np.float32(row.event.fields[spec.label.name]) for row in rows], 0)
    return out


def _within_sketch_bound(estimate: float, exact: float) -> bool:
    if abs(exact) < fs.ZERO_THRESHOLD:
        return abs(estimate - exact) <= fs.ZERO_THRESHOLD
    return abs(estimate - exact) <= ALPHA * abs(exact) * (1 + 1e-9)


def _check_against_numpy(spec, rows, stats):
    expected = _expected_values(spec, rows)
    assert stats["examples"] == len(rows)
    assert set(stats["features"]) == set(expected)  # no id, no presence flags
    for name, (values, missing) in expected.items():
        entry = stats["features"][name]
        assert (entry["count"], entry["missing"]) == (len(values), missing), name
        assert entry["missing_share"] == missing / len(rows)
        if entry["type"] == "string":
            counter = collections.Counter(values)
            ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:fs.TOP_VALUES]
            assert entry["top"] == [{"value": v, "count": c, "share": c / len(values)} for v, c in ranked], name
            assert entry["values"] == dict(counter) and entry["values_complete"] and entry["distinct"] == len(counter)
            continue
        x = np.array(values, dtype=np.float64)
        assert entry["mean"] == pytest.approx(np.mean(x), rel=1e-12, abs=1e-12), name
        assert entry["std"] == pytest.approx(np.std(x), rel=1e-9), name
        assert (entry["min"], entry["max"]) == (x.min(), x.max()), name
        assert entry["zero_share"] == np.count_nonzero(x == 0) / len(x), name
        edges = np.linspace(x.min(), x.max(), 21)
        assert entry["histogram"]["edges"] == edges.tolist(), name
        assert entry["histogram"]["counts"] == np.histogram(x, bins=edges)[0].tolist(), name
        for q, estimate in zip(fs.QUANTILES, entry["quantiles"]):
            assert _within_sketch_bound(estimate, np.quantile(x, q, method="inverted_cdf")), (name, q)


def _combine(spec, batches, order):
    """_SummarizeFn as a runner would use it: one accumulator per group of batches, merged in `order`."""
    columns = fs.stats_columns(spec)
    fn = fs._SummarizeFn(columns)
    accumulators = []
    for group in batches:
        accumulator = fn.create_accumulator()
        for batch in group:
            accumulator = fn.add_input(accumulator, batch)
        accumulators.append(accumulator)
    summary = fn.extract_output(fn.merge_accumulators([accumulators[i] for i in order]))
    ranges = fs.numeric_ranges(summary)
    histogram_fn = fs._SumHistogramsFn()
    counts = histogram_fn.create_accumulator()
    for group in reversed(batches):
        for batch in group:
            counts = histogram_fn.add_input(counts, fs.histogram_counts(columns, fs.numeric_projection(columns, batch),
                                                                        ranges))
    return fs.split_statistics(columns, summary, histogram_fn.extract_output(counts))


def test_statistics_equal_numpy_and_counter_on_hand_made_rows(taxi_spec):
    rows = _taxi_rows(300)
    stats = fs.compute_statistics(taxi_spec, _batches(taxi_spec, rows, [64, 100, 257]))
    _check_against_numpy(taxi_spec, rows, stats)
    features = stats["features"]
    assert features["pickup_trips_7d"]["missing"] == 0 and features["pickup_trips_7d"]["zero_share"] > 0
    assert features["pickup_fare_mean_30d"]["missing"] == 5  # flagged 0: missing, not a value
    assert features["company"]["missing"] == 100  # an optional string left out
    assert features["centroid_distance_miles"]["missing"] == 60 and features["centroid_distance_miles"]["zero_share"] > 0
    assert features["pickup_fare_per_mile_30d"]["min"] < 0
    assert {f["role"] for f in features.values()} == {"static", "windowed", "label"}
    assert features["fare"]["role"] == "label" and features["fare"]["missing"] == 0
    json.dumps(stats, allow_nan=False)  # JSON as it is


def test_batching_and_merge_order_do_not_change_a_bit(taxi_spec):
    rows = _taxi_rows(300)
    reference = fs.compute_statistics(taxi_spec, _batches(taxi_spec, rows, []))
    one_by_one = [[batch] for batch in _batches(taxi_spec, rows, list(range(1, 300)))]
    for groups, order in [
        ([_batches(taxi_spec, rows, [10, 150])], [0]),
        ([[b] for b in _batches(taxi_spec, rows, [3, 99, 200, 201])], [4, 0, 3, 1, 2]),
        ([_batches(taxi_spec, rows[:100], [40]), [], _batches(taxi_spec, rows[100:], [190])], [2, 1, 0]),
        (one_by_one, list(range(len(one_by_one)))[::-1]),
    ]:
        assert _combine(taxi_spec, groups, order) == reference


def _flights_row(rng: random.Random, i: int) -> FeatureRow:
    """A flights request with its 11 features; every 6th without a tail number (its three features missing)."""
    tailnum = None if i % 6 == 0 else rng.choice(["N14228", "N24211", "N619AA"])
    last3 = None if tailnum is None else tuple(float(rng.randint(-10, 90)) for _ in range(rng.randint(0, 3)))
    return FeatureRow(
        Event(f"20130101-UA{i}-EWR", "request", i, {
            "carrier": rng.choice(["UA", "AA", "DL", "B6"]), "origin": rng.choice(["EWR", "JFK", "LGA"]),
            "dest": rng.choice(["ORD", "LAX"]), "distance": float(rng.randint(100, 3000)), "hour": rng.randint(5, 23),
            "minute": rng.randint(0, 59), "month": 1, "day_of_week": 2, "tailnum": tailnum,
            "dep_delay": float(rng.randint(-10, 90))}),
        (float(rng.choice([0, rng.randint(1, 40)])), rng.uniform(-5, 60), float(rng.randint(-5, 200)),
         None if i % 10 == 0 else rng.uniform(-5, 60), None if i % 13 == 0 else rng.uniform(-5, 60),
         None if tailnum is None or not last3 else last3[0],  # the last delay: the newest of the last three
         None if tailnum is None or not last3 else float(rng.randint(60, 86_400)),
         last3,
         None if i % 4 == 0 else rng.uniform(-5, 60), None if i % 7 == 0 else rng.uniform(-5, 60),
         None if i % 5 == 0 else rng.uniform(0, 40)))


def test_flights_rows_too(flights_spec):
    rng = random.Random(3)
    rows = [_flights_row(rng, i) for i in range(250)]
    stats = fs.compute_statistics(flights_spec, _batches(flights_spec, rows, [17, 128]))
    _check_against_numpy(flights_spec, rows, stats)
    assert stats["features"]["month"]["histogram"]["counts"][-1] == 250  # one value: np.histogram's last bin
    # The tail number: an optional string, left out where missing; the sequence and its length not described.
    assert stats["features"]["tailnum"]["missing"] == sum(1 for i in range(250) if i % 6 == 0)
    assert "tailnum_dep_delay_last3_24h" not in stats["features"]
    assert "tailnum_dep_delay_last3_24h_length" not in stats["features"]


def test_an_empty_split_and_an_all_missing_column(taxi_spec):
    columns = fs.stats_columns(taxi_spec)
    empty = fs.split_statistics(columns, None, {})
    assert empty["examples"] == 0
    for entry in empty["features"].values():
        assert entry["count"] == entry["missing"] == 0 and entry["missing_share"] is None
        if entry["type"] == "numeric":
            assert all(entry[key] is None for key in ("mean", "std", "min", "max", "quantiles", "histogram",
                                                      "zero_share"))
        else:
            assert entry["distinct"] == 0 and entry["top"] == [] and entry["values"] == {}
    rows = [row._replace(features=row.features[:4] + (None, None)) for row in _taxi_rows(20)]
    stats = fs.compute_statistics(taxi_spec, _batches(taxi_spec, rows, [8]))
    missing = stats["features"]["pickup_fare_mean_30d"]
    assert (missing["count"], missing["missing"], missing["missing_share"], missing["mean"], missing["histogram"]) == (
        0, 20, 1.0, None, None)


def test_many_distinct_strings_are_capped():
    summary = fs.StringSummary()
    summary.add_counts({b"v%05d" % i: 1 + (i % 3 == 0) for i in range(fs.MAX_KEPT_VALUES + 50)}, 0, 0)
    assert len(summary.counts) == fs.MAX_KEPT_VALUES and summary.truncated
    assert all(summary.counts[b"v%05d" % i] == 2 for i in range(0, fs.MAX_KEPT_VALUES + 50, 3))  # the frequent stay


def test_more_than_1000_distinct_values_are_not_listed(flights_spec):
    rows = [FeatureRow(Event(f"20130101-UA{i}-EWR", "request", i, {
        "carrier": "UA", "origin": "EWR", "dest": f"D{i:04d}", "distance": 1.0, "hour": 1, "minute": 0, "month": 1,
        "day_of_week": 0, "tailnum": "N1", "dep_delay": 1.0}),
        (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 60.0, (1.0,), 1.0, 1.0, 0.0)) for i in range(1001)]
    dest = fs.compute_statistics(flights_spec, _batches(flights_spec, rows, [500]))["features"]["dest"]
    assert dest["distinct"] == 1001 and "values" not in dest and not dest["values_complete"]
    assert [top["value"] for top in dest["top"]] == [f"D{i:04d}" for i in range(fs.TOP_VALUES)]  # ties by value


finite_floats = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32),
    st.sampled_from([0.0, -0.0, 1e-12, -3e-10, 1.0]),
    st.floats(min_value=2e-9, max_value=1e-3),
)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite_floats, min_size=1, max_size=300), cut=st.integers(min_value=0, max_value=300),
       qs=st.lists(st.floats(min_value=0, max_value=1), max_size=5))
def test_sketch_error_bound_and_merge_invariance(values, cut, qs):
    x = np.array(values, dtype=np.float64)
    whole = fs.QuantileSketch().add(x)
    cut = min(cut, len(x))
    left, right = fs.QuantileSketch().add(x[:cut]), fs.QuantileSketch().add(x[cut:])
    assert fs.QuantileSketch().merge(left).merge(right) == whole
    assert fs.QuantileSketch().add(x[cut:]).merge(fs.QuantileSketch().add(x[:cut])) == whole
    qs = [*fs.QUANTILES, 0.0, 1.0, *qs]
    for q, estimate in zip(qs, whole.quantiles(qs)):
        exact = float(np.quantile(x, q, method="inverted_cdf"))
        assert _within_sketch_bound(estimate, exact), (q, estimate, exact)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=200))
def test_exact_sums_are_exact(values):
    x = np.array(values, dtype=np.float32)
    total, squares = fs.exact_sums(x)
    assert Fraction(total, 1 << fs._F32_SHIFT) == sum((Fraction(float(v)) for v in x), Fraction(0))
    assert Fraction(squares, 1 << fs._F32_SQUARE_SHIFT) == sum((Fraction(float(v)) ** 2 for v in x), Fraction(0))


def test_quantile_index_is_numpys_inverted_cdf():
    x = np.arange(1000, dtype=np.float64)
    for n in (1, 2, 7, 100, 1000):
        for q in (*fs.QUANTILES, 0.0, 1.0, 0.07, 0.29, 1 / 3):
            assert x[fs.quantile_index(n, q)] == np.quantile(x[:n], q, method="inverted_cdf"), (n, q)


def test_the_beam_transform_equals_the_pure_function(taxi_spec):
    rows = _taxi_rows(200)
    batches = _batches(taxi_spec, rows, [30, 31, 120])
    expected = fs.compute_statistics(taxi_spec, batches)
    empty = fs.split_statistics(fs.stats_columns(taxi_spec), None, {})
    with TestPipeline() as pipeline:
        stats = pipeline | "Batches" >> beam.Create(batches) | "Stats" >> fs.FeatureStatistics(taxi_spec)
        nothing = (pipeline | "NoBatches" >> beam.Create([batches[0]]) | "Drop" >> beam.Filter(lambda _: False)
                   | "EmptyStats" >> fs.FeatureStatistics(taxi_spec))
        assert_that(stats, equal_to([expected]), label="CheckStats")
        assert_that(nothing, equal_to([empty]), label="CheckEmpty")


def test_training_reads_stats_json_and_warns_without_it(tmp_path, caplog):
    from models.train import read_data_stats

    with caplog.at_level(logging.WARNING):
        assert read_data_stats(tmp_path) is None
    assert "stats.json not found" in caplog.text
    (tmp_path / "stats.json").write_text('{"splits": {}}\n')
    assert read_data_stats(tmp_path) == '{"splits": {}}\n'


@pytest.mark.slow
def test_the_exported_model_carries_the_stats(trained_model, flights_batch):
    _, version_dir = trained_model
    written = (flights_batch["output"] / "stats.json").read_text()
    assert (version_dir / "stats.json").read_text() == written
    assert (version_dir / "saved_model" / "assets.extra" / "stats.json").read_text() == written
    assert math.isfinite(json.loads(written)["splits"]["train"]["features"]["dep_delay"]["mean"])
