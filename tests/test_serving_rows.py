"""The rows the streaming job and batch scoring make around the model
(beam_app/serving/rows.py): the pure functions, then the DoFns on the
DirectRunner with their counters."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app.bigquery.tables import SERVED_FEATURES, in_served_sample, served_columns
from beam_app.common.job_report import counters as job_counters
from beam_app.serving.rows import CountDeadLetters, ToEventRows, ToPredictionRows, message_to_record, request_rows
from models.inference import KeyedPredictions
from transforms import counters
from transforms.events import DeadLetter, Event, time_us_to_rfc3339
from transforms.examples import RequestKey
from transforms.spec import load_spec

SPEC = load_spec("flights")
NOW_US = 1_795_000_000_000_000
STARTED_US = NOW_US - 3_600_000_000


@given(data=st.binary(max_size=200), message_id=st.text(min_size=1, max_size=20),
       attributes=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3))
@settings(max_examples=200, deadline=None)
def test_any_message_becomes_a_record_for_the_parser(data, message_id, attributes):
    record = message_to_record(PubsubMessage(data, attributes, message_id=message_id))
    assert record.source == f"pubsub:{message_id}" and record.kind == "json"
    assert record.text == data.decode("utf-8", errors="replace")  # not UTF-8: U+FFFD, a dead letter later
    assert record.attributes == attributes and record.attributes is not attributes


def test_an_empty_message_without_attributes_is_an_empty_record():
    record = message_to_record(PubsubMessage(b"", None, message_id="7"))
    assert (record.source, record.text, record.attributes) == ("pubsub:7", "", {})


def _example(**values: float) -> bytes:
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    for name, value in values.items():
        example.features.feature[name].float_list.value.append(value)
    return example.SerializeToString()


def _predictions(ids: list[str], version: str = "20261201T000000Z") -> KeyedPredictions:
    keys = tuple(RequestKey(event_id, NOW_US - 1_000_000 * n) for n, event_id in enumerate(ids))
    return KeyedPredictions(keys, tuple(_example() for _ in ids), tuple(float(n) for n in range(len(ids))), version)


def test_each_request_gets_one_prediction_row_in_order_and_no_served_row_without_a_fraction():
    rows = list(request_rows(_predictions(["a", "b", "c"]), SPEC, NOW_US, "batch"))
    assert [(r.prediction["event_id"], r.prediction["prediction"], r.served_features) for r in rows] == [
        ("a", 0.0, None), ("b", 1.0, None), ("c", 2.0, None)]
    assert rows[1].prediction == {
        "event_id": "b", "event_time": time_us_to_rfc3339(NOW_US - 1_000_000), "prediction": 1.0,
        "model_version": "20261201T000000Z", "spec_fingerprint": SPEC.fingerprint,
        "processing_time": time_us_to_rfc3339(NOW_US), "source": "batch"}
    with pytest.raises(ValueError, match="source"):
        list(request_rows(_predictions(["a"]), SPEC, NOW_US, "replay"))


def test_the_served_rows_are_the_sample_and_hold_the_example_the_model_scored():
    ids = [f"request-{n}" for n in range(200)]
    rows = list(request_rows(_predictions(ids), SPEC, NOW_US, "streaming", 0.25, STARTED_US))
    assert len(rows) == len(ids)
    sampled = [r.prediction["event_id"] for r in rows if r.served_features is not None]
    assert sampled == [event_id for event_id in ids if in_served_sample(event_id, 0.25)]
    assert 20 < len(sampled) < 80
    every = list(request_rows(_predictions(ids), SPEC, NOW_US, "streaming", 1.0, STARTED_US))
    assert all(r.served_features is not None for r in every)

    column = next(c for c in served_columns(SPEC) if c.dtype == "float32" and not c.is_sequence)
    predictions = KeyedPredictions((RequestKey("r", NOW_US),), (_example(**{column.name: 2.5}),), (9.0,), "v2")
    (rows,) = request_rows(predictions, SPEC, NOW_US, "streaming", 1.0, STARTED_US)
    served = rows.served_features
    assert {key: served[key] for key in ("event_id", "model_version", "spec_fingerprint", "processing_time",
                                         "job_start_time")} == {
        "event_id": "r", "model_version": "v2", "spec_fingerprint": SPEC.fingerprint,
        "processing_time": time_us_to_rfc3339(NOW_US), "job_start_time": time_us_to_rfc3339(STARTED_US)}
    assert served[column.name] == 2.5  # decoded from the bytes scored
    assert set(served) >= {c.name for c in served_columns(SPEC)}


def _run(pipeline_fn) -> dict[str, int]:
    pipeline = beam.Pipeline(runner="DirectRunner")
    pipeline_fn(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return job_counters(result)


def test_the_dofns_count_what_they_write():
    ids = [f"request-{n}" for n in range(40)]
    expected = list(request_rows(_predictions(ids), SPEC, NOW_US, "streaming", 0.5, STARTED_US))
    event = Event("obs-1", "observation", NOW_US, {"origin": "EWR", "dep_delay": 4.0})
    letters = [DeadLetter("pubsub:1", "{", "not JSON", "parse"), DeadLetter("pubsub:2", "{", "not JSON", "parse"),
               DeadLetter("event:x", "", "inference failed", "inference")]

    def steps(pipeline):
        rows = (pipeline | "Predictions" >> beam.Create([_predictions(ids)])
                | beam.ParDo(ToPredictionRows(SPEC, lambda: NOW_US / 1e6, "streaming", 0.5, STARTED_US))
                .with_outputs(SERVED_FEATURES, main="predictions"))
        assert_that(rows.predictions, equal_to([r.prediction for r in expected]), label="PredictionRows")
        assert_that(rows[SERVED_FEATURES], equal_to([r.served_features for r in expected if r.served_features]),
                    label="ServedRows")
        events = pipeline | "Events" >> beam.Create([event]) | beam.ParDo(ToEventRows(SPEC, lambda: NOW_US / 1e6))
        assert_that(events | beam.Map(lambda row: (row["event_id"], row["role"], row["dep_delay"])),
                    equal_to([("obs-1", "observation", 4.0)]), label="EventRows")
        counted = pipeline | "Letters" >> beam.Create(letters) | beam.ParDo(CountDeadLetters())
        assert_that(counted, equal_to(letters), label="Letters unchanged")

    counts = _run(steps)
    assert counters.PREDICTION_ROWS.of(counts) == len(ids)
    assert counters.SERVED_FEATURES_ROWS.of(counts) == sum(r.served_features is not None for r in expected)
    assert counters.EVENTS_ARCHIVED.of(counts) == 1
    assert counters.dead_letters("parse").of(counts) == 2 and counters.dead_letters("inference").of(counts) == 1
