"""The streaming job's tables, where each row goes, and how what was written
is counted (beam_app/bigquery/write.py, counts.py), without BigQuery: the
writes themselves run on the emulator in test_streaming.py."""

from __future__ import annotations

import pickle

import apache_beam as beam
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app.bigquery.counts import GROUPED_BY, count_sql, written_counts
from beam_app.bigquery.tables import (DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, events_schema, served_features_schema,
                                      table_schema)
from beam_app.bigquery.write import Destinations, ToDeadLetterRows, job_tables
from beam_app.common.job_report import counters as job_counters
from transforms import counters
from transforms.events import DeadLetter
from transforms.spec import load_spec

SPEC = load_spec("flights")


def test_a_job_writes_the_tables_it_is_given():
    assert job_tables(SPEC, predictions="p:d.predictions", dead_letters="p:d.dead") == {
        "predictions": ("p:d.predictions", PREDICTIONS_SCHEMA), "dead_letters": ("p:d.dead", DEAD_LETTERS_SCHEMA)}
    tables = job_tables(SPEC, predictions="p:d.predictions", dead_letters="p:d.dead", served_features="p:d.served",
                        events="p:d.events")
    assert list(tables) == ["predictions", "dead_letters", "served_features", "events"]
    assert tables["served_features"] == ("p:d.served", served_features_schema(SPEC))
    assert tables["events"] == ("p:d.events", events_schema(SPEC))


PREDICTION = {"event_id": "a", "event_time": "2026-11-23T12:00:00Z", "prediction": 1.5, "model_version": "v1",
              "spec_fingerprint": "f", "processing_time": "2026-11-23T12:00:01Z", "source": "streaming"}
DEAD = {"stage": "parse", "source": "pubsub:1", "payload": "{", "attributes": None, "error": "not JSON",
        "processing_time": "2026-11-23T12:00:01Z"}
SERVED = {"event_id": "a", "event_time": "2026-11-23T12:00:00Z", "model_version": "v1", "job_start_time": "x"}
EVENT = {"event_id": "o", "role": "observation", "event_time": "2026-11-23T11:00:00Z"}


def test_each_row_finds_its_table_and_each_table_its_schema():
    tables = job_tables(SPEC, predictions="p:d.predictions", dead_letters="p.d.dead", served_features="p:d.served",
                        events="p:d.events")
    destinations = pickle.loads(pickle.dumps(Destinations(tables)))  # WriteToBigQuery ships it to the workers
    assert [destinations.table(row) for row in (PREDICTION, DEAD, SERVED, EVENT)] == [
        "p:d.predictions", "p.d.dead", "p:d.served", "p:d.events"]
    # WriteToBigQuery names a destination in either form.
    assert destinations.schema("p.d.predictions") == table_schema(PREDICTIONS_SCHEMA)
    assert destinations.schema("p:d.dead") == table_schema(DEAD_LETTERS_SCHEMA)
    assert destinations.schema("p:d.served") == table_schema(served_features_schema(SPEC))


def test_dead_letter_rows_are_counted_per_stage_unless_counted_before():
    letters = [DeadLetter("pubsub:1", "{", "not JSON", "parse"), DeadLetter("event:x", "", "failed", "inference"),
               DeadLetter("pubsub:2", "{", "not JSON", "parse", {"event_time": "t"})]
    pipeline = beam.Pipeline(runner="DirectRunner")
    source = pipeline | beam.Create(letters)
    source | "Counted" >> beam.ParDo(ToDeadLetterRows(lambda: 1_795_000_000.0))
    source | "NotCounted" >> beam.ParDo(ToDeadLetterRows(lambda: 1_795_000_000.0, count=False))
    result = pipeline.run()
    result.wait_until_finish()
    counts = job_counters(result)
    assert (counters.dead_letters("parse").of(counts), counters.dead_letters("inference").of(counts)) == (2, 1)


def test_the_count_query_selects_rows_made_since_the_start_by_group():
    assert count_sql("my-project:features.predictions", "model_version", 1_795_000_000_000_000) == (
        "SELECT model_version, COUNT(*) AS n FROM `my-project.features.predictions` "
        "WHERE processing_time >= TIMESTAMP('2026-11-18T11:06:40Z') GROUP BY model_version")
    assert "FROM `my-project.features.dead_letters`" in count_sql("my-project.features.dead_letters", "stage", 0)
    assert set(GROUPED_BY) == {"predictions", "dead_letters", "served_features", "events"}


_BY = st.dictionaries(st.text(min_size=1, max_size=8), st.integers(min_value=1, max_value=10_000), max_size=4)


@given(predictions=_BY, dead=_BY, served=st.none() | _BY, events=st.none() | _BY)
@settings(max_examples=100, deadline=None)
def test_written_counts_total_the_predictions_and_served_features_and_keep_the_rest_by_group(
        predictions, dead, served, events):
    grouped = {"predictions": predictions, "dead_letters": dead}
    if served is not None:
        grouped["served_features"] = served
    if events is not None:
        grouped["events"] = events
    counts = written_counts(grouped)
    assert counts["predictions"] == sum(predictions.values())
    assert counts["predictions_by_version"] == predictions
    assert counts["dead_letters"] == dead
    assert ("served_features" in counts) == (served is not None)
    if served is not None:
        assert counts["served_features"] == sum(served.values())
    assert counts.get("events") == events
    assert grouped["predictions"] is predictions and grouped["predictions"] == predictions  # the input is left alone
