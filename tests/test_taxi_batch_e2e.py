"""End to end: `beam_app.batch` on the embedded Chicago taxi trips (all
15,002), every example checked against an independent implementation of the
chicago_taxi features in DuckDB SQL (tests/reference_features.py)."""

from __future__ import annotations

import json
from importlib import resources

import duckdb
import numpy as np
import pytest

from tests.conftest import read_examples
from tests.reference_features import TAXI_DEAD_ROWS_SQL, TAXI_FEATURES_SQL
from transforms.examples import parse_feature_spec
from transforms.spec import SPLITS, load_spec

tf = pytest.importorskip("tensorflow")

ROWS = 15_002
STATIC_STRINGS = ("pickup_community_area", "dropoff_community_area", "payment_type", "company")
STATIC_INTS = ("trip_start_hour", "trip_start_day")
COUNTS = ("pickup_trips_7d", "pickup_trips_30d")
OPTIONAL = ("pickup_fare_per_mile_7d", "pickup_fare_per_mile_30d", "pickup_fare_mean_30d",
            "pickup_trip_seconds_mean_30d")


def _csv_path() -> str:
    return str(resources.files("beam_app") / "data" / "chicago_taxi.csv")


def _close(got, expected) -> bool:
    """float32 of a sum or a formula computed in another order: within a few ulps."""
    return bool(np.isclose(got, np.float32(expected), rtol=1e-6, atol=0.0))


@pytest.mark.slow
def test_counts_add_up_and_dead_letters_name_the_offending_field(taxi_batch):
    summary = taxi_batch["summary"]
    dead_rows = dict(duckdb.execute(TAXI_DEAD_ROWS_SQL, [_csv_path()]).fetchall())  # raw line -> bad fields
    good = ROWS - len(dead_rows)
    assert summary["records_read"] == ROWS == sum(summary["examples"].values()) + summary["dead_letters"]
    assert summary["dead_letters"] == len(dead_rows) > 0
    assert summary["requests"] == summary["observations"] == summary["feature_rows"] == good
    assert summary["unlabeled_requests"] == 0  # a good trip always has its fare
    assert all(summary["checks"].values()), summary["checks"]

    dead = [json.loads(line) for path in (taxi_batch["output"] / "dead_letters").glob("*.ndjson")
            for line in path.read_text().splitlines()]
    assert len(dead) == len(dead_rows)
    assert {d["raw"] for d in dead} == set(dead_rows)
    for letter in dead:
        fields = dead_rows[letter["raw"]]
        assert any(field in letter["reason"] for field in fields), (letter, fields)
        assert letter["stage"] == "parse", letter


@pytest.mark.slow
def test_every_example_matches_duckdb(taxi_batch):
    output = taxi_batch["output"]
    spec = load_spec(output / "spec.json")  # the written spec.json is enough to read the data
    feature_spec = parse_feature_spec(spec)
    examples = {split: read_examples(output, split, feature_spec) for split in SPLITS}

    cursor = duckdb.execute(TAXI_FEATURES_SQL, [_csv_path()])
    names = [d[0] for d in cursor.description]
    expected = [dict(zip(names, row)) for row in cursor.fetchall()]
    assert sum(len(e) for e in examples.values()) == len(expected) == sum(taxi_batch["summary"]["examples"].values())
    for split in SPLITS:
        assert len(examples[split]) == sum(row["split"] == split for row in expected) == \
            taxi_batch["summary"]["examples"][split], split

    seen = {"empty_7d": 0, "empty_30d": 0, "no_centroid_distance": 0, "ratio_present": 0,
            "ratio_missing_in_a_nonempty_window": 0, "no_dropoff_area": 0, "no_company": 0}
    positive = {split: set() for split in SPLITS}
    for row in expected:
        event_id, split = row["event_id"], row["split"]
        example = examples[split][event_id]  # KeyError: missing, or in the wrong split
        assert example["fare"] == np.float32(row["fare"]), (event_id, example["fare"], row["fare"])
        for name in STATIC_STRINGS:
            assert example[name] == (row[name] or "").encode(), (event_id, name, example[name], row[name])
        for name in STATIC_INTS:
            assert example[name] == row[name], (event_id, name, example[name], row[name])
        distance = row["centroid_distance_miles"]
        if distance is None:
            seen["no_centroid_distance"] += 1
            assert example["centroid_distance_miles_present"] == 0, event_id
            assert example["centroid_distance_miles"] == 0.0, event_id
        else:
            assert example["centroid_distance_miles_present"] == 1, event_id
            assert _close(example["centroid_distance_miles"], distance), \
                (event_id, example["centroid_distance_miles"], distance)
        for name in COUNTS:
            assert example[name] == row[name], (event_id, name, example[name], row[name])
            if row[name] > 0:
                positive[split].add(name)
        for name in OPTIONAL:
            value = row[name]
            if value is None:
                assert example[f"{name}_present"] == 0 and example[name] == 0.0, (event_id, name, example[name])
            else:
                assert example[f"{name}_present"] == 1, (event_id, name)
                assert _close(example[name], value), (event_id, name, example[name], value)
                if value > 0:
                    positive[split].add(name)
        seen["empty_7d"] += row["pickup_trips_7d"] == 0
        seen["empty_30d"] += row["pickup_trips_30d"] == 0
        seen["ratio_present"] += row["pickup_fare_per_mile_7d"] is not None
        seen["ratio_missing_in_a_nonempty_window"] += \
            row["pickup_fare_per_mile_7d"] is None and row["pickup_trips_7d"] > 0
        seen["no_dropoff_area"] += row["dropoff_community_area"] == ""
        seen["no_company"] += row["company"] == ""
    # Not vacuous: every case occurs, every feature is non-zero somewhere in every split.
    assert all(seen.values()), seen
    for split in SPLITS:
        assert positive[split] == set(COUNTS + OPTIONAL), (split, positive[split])


@pytest.mark.slow
def test_rate_baseline_equals_the_courses_heuristic_computed_from_sql(taxi_batch):
    from models import train

    spec = load_spec(taxi_batch["output"] / "spec.json")
    cursor = duckdb.execute(TAXI_FEATURES_SQL, [_csv_path()])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    train_rows = [row for row in rows if row["split"] == "train"]
    with_distance = [row for row in train_rows if row["centroid_distance_miles"] is not None]
    rate = sum(row["fare"] for row in with_distance) / sum(row["centroid_distance_miles"] for row in with_distance)
    median = float(np.median(np.float32([row["fare"] for row in train_rows])))

    got = train.rate_baseline(train.Params(str(taxi_batch["output"]), ""), spec, median)
    assert got["field"] == "centroid_distance_miles"
    assert got["rate"] == pytest.approx(rate, rel=1e-5)
    for split in ("eval", "test"):
        part = [row for row in rows if row["split"] == split]
        errors = np.array([(rate * row["centroid_distance_miles"] if row["centroid_distance_miles"] is not None
                            else median) - row["fare"] for row in part])
        assert got[split]["mae"] == pytest.approx(np.abs(errors).mean(), rel=1e-4)
        assert got[split]["rmse"] == pytest.approx(np.sqrt(np.square(errors).mean()), rel=1e-4)
        assert got["coverage"][split] == pytest.approx(
            np.mean([row["centroid_distance_miles"] is not None for row in part]))
        assert 0.5 < got["coverage"][split] < 1.0  # both cases occur
