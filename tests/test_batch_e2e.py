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
from tests.reference_features import FEATURES_SQL
from tests.flights_slice import slice_events
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


@pytest.mark.slow
def test_every_example_matches_duckdb(flights_batch):
    output = flights_batch["output"]
    spec = load_spec(output / "spec.json")  # the written spec.json is enough to read the data
    feature_spec = parse_feature_spec(spec)
    examples = {split: read_examples(output, split, feature_spec) for split in ("train", "eval", "test")}

    expected = duckdb.execute(FEATURES_SQL, [str(flights_batch["good_csv"])]).fetchall()
    labeled = [row for row in expected if row[1] is not None]
    assert sum(len(e) for e in examples.values()) == len(labeled) == sum(flights_batch["summary"]["examples"].values())
    assert all(len(examples[split]) > 300 for split in examples)

    names = ("origin_departures_1h", "origin_dep_delay_mean_1h", "origin_dep_delay_max_1h",
             "origin_dep_delay_mean_3h", "carrier_dep_delay_mean_3h")
    empty_windows = 0
    for event_id, label, split, *values in labeled:
        example = examples[split][event_id]  # KeyError: missing, or in the wrong split
        assert example["dep_delay"] == np.float32(label)
        assert example["origin_departures_1h"] == values[0]
        for name, value in zip(names[1:], values[1:]):
            if value is None:
                empty_windows += 1
                assert example[f"{name}_present"] == 0 and example[name] == 0.0, (event_id, name)
            else:
                assert example[f"{name}_present"] == 1, (event_id, name)
                assert example[name] == np.float32(value), (event_id, name, example[name], value)
    assert empty_windows > 0  # the slice has early-morning requests with empty windows


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
            assert from_json[event_id][name] == value, (event_id, name)


@pytest.mark.slow
def test_stats_json_describes_the_examples_written(flights_batch):
    stats = json.loads((flights_batch["output"] / "stats.json").read_text())
    spec = load_spec(flights_batch["output"] / "spec.json")
    assert stats["spec"] == {"name": spec.name, "fingerprint": spec.fingerprint}
    examples = flights_batch["summary"]["examples"]
    assert {name: split["examples"] for name, split in stats["splits"].items()} == examples
    train = stats["splits"]["train"]["features"]
    assert train["dep_delay"]["count"] == examples["train"] and train["dep_delay"]["missing"] == 0
    assert all(entry["count"] + entry["missing"] == examples["train"] for entry in train.values())
