"""The RunInference model handler on the batch job's own examples, and the rows
the streaming job writes."""

from __future__ import annotations

import base64
import json
import shutil

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_app.bigquery.tables import (DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, dead_letter_row, failed_inference_letters,
                             failed_row_letter, prediction_row)
from transforms.events import DeadLetter
from transforms.examples import KeyedBatch, RequestKey, keyed_batch

tf = pytest.importorskip("tensorflow")

from models.export import SpecMismatch  # noqa: E402
from models.inference import (KeyedBatches, KeyedPredictions, LoadedModel, SavedModelHandler,  # noqa: E402
                              load_checked_model, locate_model, per_request, placeholder_example, predict,
                              predict_keyed)
from models.data import split_files  # noqa: E402


def _test_examples(data_dir: str, count: int) -> list[bytes]:
    records = tf.data.TFRecordDataset(split_files(data_dir, "test"), compression_type="GZIP").take(count)
    return [record.numpy() for record in records]


def test_locate_model_from_model_dir_version_dir_or_saved_model(trained_model, tmp_path):
    _, version_dir = trained_model
    expected = (str(version_dir / "saved_model"), version_dir.name, False)
    assert locate_model(str(version_dir.parent)) == expected[:2] + (True,)  # through LATEST: it may move on
    assert locate_model(str(version_dir)) == expected
    assert locate_model(str(version_dir / "saved_model") + "/") == expected
    standalone = tmp_path / "exported"
    shutil.copytree(version_dir / "saved_model", standalone)
    assert locate_model(str(standalone)) == (str(standalone), "exported", False)
    with pytest.raises(FileNotFoundError, match="model directory of `python -m models.train`"):
        locate_model(str(tmp_path / "nothing"))


def _matches_within_float32(expected: dict):
    """Model outputs equal to float32 rounding: the same example can come out
    up to ~1.5e-6 apart in batches of different sizes (TensorFlow's kernels
    accumulate in another order), which is not a difference in features."""
    def check(actual):
        got = {key: (value, version) for key, value, version in actual}
        assert got.keys() == expected.keys()
        for key, (value, version) in expected.items():
            assert got[key][1] == version
            assert got[key][0] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    return check


def test_a_keyed_batch_is_its_pairs_in_order():
    batch = keyed_batch([(RequestKey("a", 1), b"x"), (RequestKey("b", 2), b"y")])
    assert batch == KeyedBatch((RequestKey("a", 1), RequestKey("b", 2)), (b"x", b"y"))
    assert len(batch) == 2  # what RunInference's metrics count: examples, not elements
    assert list(batch) == [(RequestKey("a", 1), b"x"), (RequestKey("b", 2), b"y")]
    with pytest.raises(ValueError, match="2 keys and 1 examples"):
        KeyedBatch(("a", "b"), (b"x",))


def _length_model(version: str) -> LoadedModel:
    """A stand-in for the signature: the prediction is the example's length."""
    def serve(examples):
        return {"prediction": tf.strings.length(examples)}
    return LoadedModel(None, serve, version)


def test_a_keyed_batch_gives_each_request_exactly_its_own_prediction():
    batch = KeyedBatch(("k1", "k2", "k3"), (b"a", b"bbb", b"cc"))
    predicted = predict_keyed(batch, _length_model("v7"))
    assert predicted == KeyedPredictions(("k1", "k2", "k3"), (b"a", b"bbb", b"cc"), (1, 3, 2), "v7")
    assert per_request(predicted) == [
        ("k1", PredictionResult(b"a", 1, "v7")), ("k2", PredictionResult(b"bbb", 3, "v7")),
        ("k3", PredictionResult(b"cc", 2, "v7"))]
    assert per_request(predict_keyed(KeyedBatch((), ()), _length_model("v7"))) == []


def test_a_model_that_does_not_answer_one_prediction_per_example_fails_the_batch():
    model = LoadedModel(None, lambda examples: {"prediction": tf.zeros([1])}, "v1")
    with pytest.raises(ValueError, match=r"shape \(1,\) for a batch of 2"):
        predict_keyed(KeyedBatch(("a", "b"), (b"x", b"y")), model)


def test_a_failed_keyed_batch_is_a_dead_letter_per_request():
    batch = KeyedBatch((RequestKey("a", 1), RequestKey("b", 2)), (b"x", b"y"))
    letters = failed_inference_letters(batch, ("ValueError", "ValueError('boom')", []))
    assert [(d.source, base64.b64decode(d.raw), d.reason, d.stage) for d in letters] == [
        ("event:a", b"x", "inference failed: ValueError('boom')", "inference"),
        ("event:b", b"y", "inference failed: ValueError('boom')", "inference")]


@pytest.mark.slow
def test_run_inference_on_keyed_batches_equals_the_signature_called_directly(trained_model, flights_spec):
    params, version_dir = trained_model
    examples = _test_examples(params.data_dir, 300)
    direct = tf.saved_model.load(str(version_dir / "saved_model")).signatures["serving_default"](
        examples=tf.constant(examples))["prediction"].numpy()
    expected = {f"k{i}": (float(value), version_dir.name) for i, value in enumerate(direct)}
    with TestPipeline() as p:
        results = (
            p
            | beam.Create([(f"k{i}", example) for i, example in enumerate(examples)])
            | KeyedBatches(max_batch_size=64)
            | RunInference(SavedModelHandler(str(version_dir), flights_spec))
            | beam.FlatMap(per_request)
            | beam.MapTuple(lambda key, result: (key, result.inference, result.model_id))
        )
        assert_that(results, _matches_within_float32(expected))  # one prediction per request, no more


@pytest.mark.slow
def test_bytes_that_are_not_an_example_fail_the_batch_into_dead_letters(trained_model, flights_spec):
    params, version_dir = trained_model
    good = _test_examples(params.data_dir, 2)
    with TestPipeline() as p:
        elements = [(RequestKey("ok1", 1), good[0]), (RequestKey("bad", 2), b"not a tf.Example"),
                    (RequestKey("ok2", 3), good[1])]
        predictions, failed = (p | beam.Create(elements) | KeyedBatches(min_batch_size=10, max_batch_size=10)
                               | RunInference(SavedModelHandler(str(version_dir), flights_spec))
                               .with_exception_handling())
        letters = failed.failed_inferences | beam.FlatMapTuple(failed_inference_letters)
        assert_that(predictions, equal_to([]), label="NoPredictions")

        def check(letters):
            assert sorted((d.source, d.stage, base64.b64decode(d.raw)) for d in letters) == [
                ("event:bad", "inference", b"not a tf.Example"), ("event:ok1", "inference", good[0]),
                ("event:ok2", "inference", good[1])]
            assert all("inference failed: InvalidArgumentError" in d.reason for d in letters), letters[0].reason

        assert_that(letters, check, label="EveryExampleOfTheBatchIsADeadLetter")


def test_a_model_of_another_spec_is_refused_at_load(trained_model, flights_spec):
    import dataclasses

    _, version_dir = trained_model
    other = dataclasses.replace(flights_spec, name="flights_v2", windowed_features=flights_spec.windowed_features[:4])
    with pytest.raises(SpecMismatch, match="retrain on data written with this spec"):
        load_checked_model(str(version_dir), other)
    assert load_checked_model(str(version_dir), flights_spec).version == version_dir.name


def test_the_placeholder_the_load_warms_the_model_with_is_an_example_of_the_spec(trained_model, flights_spec):
    import math

    params, version_dir = trained_model
    placeholder = placeholder_example(flights_spec)
    # The columns of an example the batch job wrote (its label aside), and every value zero or empty.
    written = tf.train.Example.FromString(_test_examples(params.data_dir, 1)[0]).features.feature
    parsed = tf.train.Example.FromString(placeholder).features.feature
    assert set(parsed) == set(written) - {flights_spec.label.name}
    for name, feature in parsed.items():
        kind = feature.WhichOneof("kind")
        assert kind == written[name].WhichOneof("kind"), name
        values = list(getattr(feature, kind).value)
        assert len(values) == len(getattr(written[name], kind).value), name
        assert all(value in (0, b"") for value in values), (name, values)
    # The loaded model scores it as the SavedModel's signature does.
    model = load_checked_model(str(version_dir), flights_spec)
    (prediction,) = predict([placeholder], model)
    direct = tf.saved_model.load(str(version_dir / "saved_model")).signatures["serving_default"](
        examples=tf.constant([placeholder]))["prediction"].numpy()
    assert math.isfinite(prediction) and prediction == pytest.approx(float(direct[0]), rel=1e-6, abs=1e-6)


def test_prediction_row_has_every_schema_field_in_bigquery_form():
    row = prediction_row(RequestKey("20130101-UA1545-EWR", 1357031700_000000), 12.5, "20261123T101500Z",
                         "ab" * 32, 1_700_000_000_123_456, "batch")
    assert row == {"event_id": "20130101-UA1545-EWR", "event_time": "2013-01-01T09:15:00Z", "prediction": 12.5,
                   "model_version": "20261123T101500Z", "spec_fingerprint": "ab" * 32,
                   "processing_time": "2023-11-14T22:13:20.123456Z", "source": "batch"}
    assert list(row) == [field["name"] for field in PREDICTIONS_SCHEMA]
    with pytest.raises(ValueError, match="streaming"):
        prediction_row(RequestKey("x", 0), 1.0, "v", "f", 0, "backfill")


def test_dead_letter_rows_keep_payload_attributes_and_reason():
    letter = DeadLetter("pubsub:17", "{oops", "not valid JSON: ...", "parse", {"event_time": "2013-01-01T00:00:00Z"})
    row = dead_letter_row(letter, 1_000_000)
    assert row == {"stage": "parse", "source": "pubsub:17", "payload": "{oops",
                   "attributes": '{"event_time": "2013-01-01T00:00:00Z"}', "error": "not valid JSON: ...",
                   "processing_time": "1970-01-01T00:00:01Z"}
    assert list(row) == [field["name"] for field in DEAD_LETTERS_SCHEMA]
    refused = failed_row_letter("p:d.predictions", {"event_id": "x", "prediction": None},
                                [{"reason": "invalid", "message": "prediction is REQUIRED"}])
    assert refused.stage == "bigquery" and refused.source == "p:d.predictions"
    assert json.loads(refused.raw) == {"event_id": "x", "prediction": None}
    assert "prediction is REQUIRED" in refused.reason
    assert dead_letter_row(refused, 0)["attributes"] is None
