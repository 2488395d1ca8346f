"""The streaming job's start-up checks and its BigQuery writes (on the real
BigQuery emulator); the whole job end to end is in test_streaming_e2e.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import apache_beam as beam
import pytest
import yaml

from beam_app import streaming
from beam_app.bigquery.client import EndpointBigQueryClient, bigquery_client, ensure_table
from beam_app.bigquery.tables import DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, events_schema, served_features_schema
from transforms.events import DeadLetter
from transforms.spec import load_spec

PROJECT = "test-project"


def test_options_say_what_is_missing():
    with pytest.raises(streaming.UsageError, match="exactly one of --input_subscription"):
        streaming._check_options(streaming.StreamingOptions(["--model", "m"]))
    with pytest.raises(streaming.UsageError, match="--predictions_table is required"):
        streaming._check_options(streaming.StreamingOptions(
            ["--input_topic", "projects/p/topics/t", "--model", "m", "--dead_letter_table", "p:d.t"]))
    with pytest.raises(streaming.UsageError, match="--key_shards must be 0"):
        streaming.key_shards(streaming.StreamingOptions(["--key_shards", "-1"]))
    assert streaming.key_shards(streaming.StreamingOptions(["--runner", "DirectRunner"])) == 1
    assert streaming.key_shards(streaming.StreamingOptions(["--runner", "DataflowRunner"])) is None
    assert streaming.key_shards(streaming.StreamingOptions(["--runner", "DirectRunner", "--key_shards", "0"])) is None


FULL = ["--input_topic", "projects/p/topics/t", "--model", "m", "--predictions_table", "p:d.p",
        "--dead_letter_table", "p:d.t"]


def test_id_attribute_and_a_missing_bootstrap_are_refused_at_start_with_what_to_do(tmp_path):
    with pytest.raises(streaming.UsageError, match="--id_attribute works on Dataflow only: .* Leave it out here"):
        streaming._check_options(streaming.StreamingOptions([*FULL, "--id_attribute", "message_key"]))
    streaming._check_options(streaming.StreamingOptions([*FULL, "--id_attribute", "message_key",
                                                         "--runner", "DataflowRunner"]))
    with pytest.raises(streaming.UsageError, match="--bootstrap_input .* matches no file"):
        streaming._check_options(streaming.StreamingOptions([*FULL, "--bootstrap_input", str(tmp_path / "*.ndjson")]))


class _Clock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_a_stop_waits_until_the_tables_stop_changing_and_no_longer_than_its_limit():
    clock = _Clock()
    rows = iter([1, 2, 3, 3, 3, 3, 3, 3, 3, 3])  # one more row each poll, then none
    assert streaming.settle(lambda: next(rows), quiet_s=1.0, max_s=2.5, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(1.5)  # the last change at 0.5 s, then 1 s of quiet
    clock = _Clock()
    growing = iter(range(100))  # a job that never settles
    assert not streaming.settle(lambda: next(growing), quiet_s=1.0, max_s=2.5, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(2.5)


@pytest.mark.slow
def test_a_model_trained_on_another_spec_refuses_to_start(trained_model, flights_spec, tmp_path):
    _, version_dir = trained_model
    other = dataclasses.replace(flights_spec, name="flights_v2", windowed_features=flights_spec.windowed_features[:4])
    spec_file = tmp_path / "flights_v2.yaml"
    spec_file.write_text(yaml.safe_dump(other.to_document()))
    # Nothing runs on these Pub/Sub and BigQuery names: the check comes first.
    done = subprocess.run(
        [sys.executable, "-m", "beam_app.streaming", "--spec", str(spec_file), "--model", str(version_dir.parent),
         "--input_subscription", "projects/nowhere/subscriptions/none", "--predictions_table", "nowhere:d.p",
         "--dead_letter_table", "nowhere:d.dl"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "error: model" in done.stderr and f"was trained on spec {flights_spec.fingerprint[:12]}" in done.stderr
    assert f"this job uses spec 'flights_v2' {other.fingerprint[:12]}" in done.stderr


@pytest.mark.slow
def test_rows_bigquery_refuses_become_dead_letters(bigquery_emulator):
    predictions_table, dead_letter_table = f"{PROJECT}:refused.predictions", f"{PROJECT}:refused.dead_letters"
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    ensure_table(client, predictions_table, PREDICTIONS_SCHEMA)
    ensure_table(client, dead_letter_table, DEAD_LETTERS_SCHEMA)
    good = {"event_id": "ok", "event_time": "2026-11-23T12:00:00Z", "prediction": 1.5, "model_version": "v1",
            "spec_fingerprint": "f" * 64, "processing_time": "2026-11-23T12:00:01Z"}
    bad = {**good, "event_id": "bad", "prediction": None}  # REQUIRED
    letter = DeadLetter("pubsub:1", "{oops", "not valid JSON", "parse", {"event_time": "2026-11-23T12:00:00Z"})
    # The optional tables go through the same write: a served-features row and an event row find theirs.
    spec = load_spec("flights")
    served_table, events_table = f"{PROJECT}:refused.served_features", f"{PROJECT}:refused.events"
    ensure_table(client, served_table, served_features_schema(spec))
    ensure_table(client, events_table, events_schema(spec))
    served = {**{key: good[key] for key in ("event_id", "event_time", "model_version", "spec_fingerprint",
                                            "processing_time")},
              "job_start_time": "2026-11-23T11:00:00Z", "origin": "EWR", "origin_departures_1h": 3}
    event = {"event_id": "obs", "role": "observation", "event_time": "2026-11-23T11:59:00Z",
             "processing_time": "2026-11-23T12:00:00Z", "origin": "EWR", "dep_delay": 4.0}
    tables = {"predictions": (predictions_table, PREDICTIONS_SCHEMA),
              "dead_letters": (dead_letter_table, DEAD_LETTERS_SCHEMA),
              "served_features": (served_table, served_features_schema(spec)),
              "events": (events_table, events_schema(spec))}
    with beam.Pipeline(runner="DirectRunner") as pipeline:
        streaming.write_outputs(
            {"predictions": pipeline | "Predictions" >> beam.Create([good, bad]),
             "served_features": pipeline | "Served" >> beam.Create([served]),
             "events": pipeline | "Events" >> beam.Create([event]),
             "dead_letters": pipeline | "DeadLetters" >> beam.Create([letter])},
            tables, EndpointBigQueryClient(PROJECT, bigquery_emulator.endpoint), clock=lambda: 1_795_000_000.0)

    (served_row,) = [dict(r.items()) for r in client.query(f"SELECT * FROM `{PROJECT}.refused.served_features`").result()]
    assert (served_row["event_id"], served_row["origin"], served_row["origin_departures_1h"]) == ("ok", "EWR", 3)
    (event_row,) = [dict(r.items()) for r in client.query(f"SELECT * FROM `{PROJECT}.refused.events`").result()]
    assert (event_row["event_id"], event_row["role"], event_row["dep_delay"]) == ("obs", "observation", 4.0)

    rows = [dict(r.items()) for r in client.query(f"SELECT * FROM `{PROJECT}.refused.predictions`").result()]
    assert [row["event_id"] for row in rows] == ["ok"]
    dead = {row["stage"]: dict(row.items())
            for row in client.query(f"SELECT * FROM `{PROJECT}.refused.dead_letters`").result()}
    assert set(dead) == {"parse", "bigquery"}
    assert dead["parse"]["payload"] == "{oops" and dead["parse"]["error"] == "not valid JSON"
    assert json.loads(dead["parse"]["attributes"]) == {"event_time": "2026-11-23T12:00:00Z"}
    refused = dead["bigquery"]
    assert json.loads(refused["payload"]) == bad
    assert "prediction" in refused["error"] and "invalid" in refused["error"]
    assert refused["source"].endswith("refused.predictions")
    assert refused["processing_time"].isoformat().startswith("2026-11-18T")  # the injected clock
