"""End to end: `beam_app.batch` on a slice of the real flights, every example
checked against an independent implementation of the features in DuckDB SQL."""

from __future__ import annotations

import dataclasses
import json

import duckdb
import numpy as np
import pytest

from beam_app import batch
from tests.conftest import BAD_ROWS, read_examples
from tests.flights_slice import slice_events, weather_lines
from tests.reference_features import FLIGHTS_V2_FEATURES_SQL
from transforms.events import event_to_json
from transforms.split import assign_split
from transforms.examples import parse_feature_spec
from transforms.spec import load_spec

tf = pytest.importorskip("tensorflow")



@pytest.mark.slow
def test_counts_add_up_and_bad_rows_are_dead_letters(flights_batch):
    summary = flights_batch["summary"]
    assert summary["records_read"] == flights_batch["rows"] + len(BAD_ROWS)
    assert summary["dead_letters"] == len(BAD_ROWS)
    assert all(summary["checks"].values()), summary["checks"]
    dead = [json.loads(line) for path in (flights_batch["output"] / "dead_letters").glob("*.ndjson")
            for line in path.read_text().splitlines()]
    assert {d["raw"] for d in dead} == set(BAD_ROWS)
    for letter in dead:
        assert BAD_ROWS[letter["raw"]] in letter["reason"] and letter["stage"] == "parse"
        assert letter["source"].rsplit(":", 1)[1].isdigit()


def _sql_rows(flights_csv, weather_csv) -> list[dict]:
    cursor = duckdb.execute(FLIGHTS_V2_FEATURES_SQL, [str(flights_csv), str(weather_csv)])
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _check_example(spec, example: dict, expected: dict, counts: dict) -> None:
    """One example's windowed features against the SQL's values, as the encoder writes them."""
    event_id = expected["event_id"]
    assert example["dep_delay"] == np.float32(expected["label"])
    for feature in spec.windowed_features:
        name, value = feature.name, expected[feature.name]
        present = example.get(f"{name}_present")
        if feature.rule.sequence:
            values = list(value or [])
            assert example[f"{name}_length"] == (expected[f"{name}_length"] or 0) == len(values), (event_id, name)
            padded = np.zeros(feature.k, dtype=np.float32)
            padded[:len(values)] = values
            assert list(example[name]) == list(padded), (event_id, name, example[name], values)
            if present is not None:
                assert present == (0 if expected[f"{name}_length"] is None else 1), (event_id, name)
            counts["sequences"] += bool(values)
        elif feature.rule.integer:
            assert example[name] == value, (event_id, name)
        elif value is None:
            counts["empty"] += 1
            assert present == 0 and example[name] == 0.0, (event_id, name)
        else:
            assert present == 1, (event_id, name)
            if feature.aggregate == "stddev":  # SQL's stddev_pop is not exactly rounded: within float32's ulp
                assert example[name] == pytest.approx(np.float32(value), rel=1e-6, abs=1e-6), (event_id, name)
            else:
                assert example[name] == np.float32(value), (event_id, name, example[name], value)


def _check_every_example(spec, output, expected_rows, summary) -> dict:
    feature_spec = parse_feature_spec(spec)
    examples = {split: read_examples(output, split, feature_spec) for split in ("train", "eval", "test")}
    labeled = [row for row in expected_rows if row["label"] is not None]
    assert sum(len(e) for e in examples.values()) == len(labeled) == sum(summary["examples"].values())
    assert all(len(examples[split]) > 300 for split in examples)
    counts = {"empty": 0, "sequences": 0}
    for expected in labeled:
        example = examples[expected["split"]][expected["event_id"]]  # KeyError: missing, or in the wrong split
        _check_example(spec, example, expected, counts)
    return counts


@pytest.mark.slow
def test_every_example_matches_duckdb(flights_batch, tmp_path):
    """Every flights feature (the aircraft's last delay and the time since it,
    its last three, route, dest, stddev and the first five) of every example."""
    spec = load_spec(flights_batch["output"] / "spec.json")  # the written spec.json is enough to read the data
    weather = tmp_path / "weather.csv"  # the flights spec reads none: an empty file for the query's weather side
    weather.write_text(weather_lines(lambda month, day: False)[0] + "\n")
    counts = _check_every_example(spec, flights_batch["output"], _sql_rows(flights_batch["good_csv"], weather),
                                  flights_batch["summary"])
    assert counts["empty"] > 0 and counts["sequences"] > 0  # early-morning empty windows; aircraft seen before


@pytest.mark.slow
def test_flights_weather_examples_match_duckdb(flights_weather_batch):
    """The second kind of observation: the weather features of every example
    too, from the weather of the same days, read as a source of their own."""
    spec = load_spec(flights_weather_batch["output"] / "spec.json")
    assert [f.name for f in spec.windowed_features][-3:] == [
        "origin_visib_min_3h", "origin_precip_sum_3h", "origin_wind_speed_max_3h"]
    summary = flights_weather_batch["summary"]
    assert summary["observations_by_kind"]["weather"] == len(weather_lines_of(flights_weather_batch)) - 1
    assert all(summary["checks"].values()), summary["checks"]
    _check_every_example(spec, flights_weather_batch["output"],
                         _sql_rows(flights_weather_batch["flights_csv"], flights_weather_batch["weather_csv"]),
                         summary)


def weather_lines_of(batch_run) -> list[str]:
    return batch_run["weather_csv"].read_text().splitlines()


@pytest.mark.slow
def test_ndjson_events_give_the_same_examples_and_hash_split_routes_them(flights_batch, tmp_path):
    """The JSON events the streaming branch receives, read as history, give
    exactly the examples the CSV gave; --split hash routes each by event_id."""
    spec = load_spec("flights")
    events = slice_events(spec, flights_batch["good_csv"].read_text().splitlines())
    ndjson = tmp_path / "events.ndjson"
    ndjson.write_text("".join(event_to_json(event) + "\n" for event in events))
    output = tmp_path / "out"
    summary = batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--input", str(ndjson),
                         "--output", str(output), "--split", "hash"])
    assert summary["records_read"] == len(events) and summary["dead_letters"] == 0
    assert all(summary["checks"].values())

    feature_spec = parse_feature_spec(spec)
    from_csv = {}
    for split in ("train", "eval", "test"):
        from_csv.update(read_examples(flights_batch["output"], split, feature_spec))
    hash_split = dataclasses.replace(spec.split, method="hash")  # the spec's fractions, as the run used
    assert json.loads((output / "spec.json").read_text())["split"]["method"] == "hash"
    from_json = {}
    for split in ("train", "eval", "test"):
        examples = read_examples(output, split, feature_spec)
        assert examples, split
        for event_id in examples:
            assert assign_split(hash_split, 0, event_id) == split
        from_json.update(examples)
    assert from_json.keys() == from_csv.keys()
    for event_id, example in from_csv.items():
        for name, value in example.items():
            assert np.array_equal(from_json[event_id][name], value), (event_id, name)


@pytest.mark.slow
def test_stats_json_describes_the_examples_written(flights_batch):
    stats = json.loads((flights_batch["output"] / "stats.json").read_text())
    spec = load_spec(flights_batch["output"] / "spec.json")
    assert stats["spec"] == {"name": spec.name, "fingerprint": spec.fingerprint}
    examples = flights_batch["summary"]["examples"]
    assert {name: split["examples"] for name, split in stats["splits"].items()} == examples
    train = stats["splits"]["train"]["features"]
    assert train["dep_delay"]["count"] == examples["train"] and train["dep_delay"]["missing"] == 0
    # Present and missing values counted here from the written bytes: a value is missing where its
    # `<name>_present` flag is 0, or, without a flag, where the example leaves the feature out.
    expected = {name: [0, 0] for name in train}
    files = sorted(str(path) for path in (flights_batch["output"] / "train").glob("examples-*.tfrecord.gz"))
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        for name, counts in expected.items():
            flag = feature.get(f"{name}_present")
            if flag is not None:
                present = flag.int64_list.value[0] == 1
            else:
                present = name in feature and len(getattr(feature[name], feature[name].WhichOneof("kind")).value) > 0
            counts[0 if present else 1] += 1
    assert {name: [entry["count"], entry["missing"]] for name, entry in train.items()} == expected
    assert any(missing for _, missing in expected.values())  # the slice has missing values to count
