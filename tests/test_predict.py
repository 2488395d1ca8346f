"""Batch scoring (`python -m beam_app.predict`): the same features and model
as both jobs, exactly one prediction or dead letter per request in range.

The reference for the predictions is independent of the scoring job: the
batch job's own examples (the training data) fed to the SavedModel's
signature directly. The reference for which requests are scored is the
slice's events, parsed and filtered here."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from hypothesis import given
from hypothesis import strategies as st

from beam_app import predict
from beam_app.common.errors import UsageError
from beam_app.common.times import time_flag_us, time_range_us
from tests.conftest import BAD_ROWS, DAYS
from tests.flights_slice import flights_lines, slice_events
from transforms.events import Event, RawRecord, event_to_json, rfc3339_to_time_us
from transforms.spec import SPLITS, SpecError, load_spec
from transforms.time_range import in_time_range

tf = pytest.importorskip("tensorflow")

from models.data import split_files  # noqa: E402
from models.export import SpecMismatch  # noqa: E402
from models.inference import SavedModelHandler  # noqa: E402

START = "2013-11-30T12:00:00Z"
END = "2013-12-01T12:00:00Z"
HOUR_US = 3_600_000_000


@given(role=st.sampled_from(["request", "observation", "weather"]), time_us=st.integers(-10, 10),
       start_us=st.none() | st.integers(-10, 10), end_us=st.none() | st.integers(-10, 10),
       reach_us=st.integers(0, 5))
def test_the_range_keeps_requests_in_it_and_the_observations_they_can_see(role, time_us, start_us, end_us, reach_us):
    event = Event("e", role, time_us, {})
    kept = in_time_range(event, start_us, end_us, reach_us)
    before_end = end_us is None or time_us < end_us
    if role == "request":
        assert kept == (before_end and (start_us is None or time_us >= start_us))
    else:  # windows are [t - W, t): seen by some request t in [start, end) iff start - W <= time < end
        assert kept == (before_end and (start_us is None or time_us >= start_us - reach_us))


def test_time_flags_take_dates_and_rfc3339_times():
    assert time_flag_us("2013-12-01", "--start") == rfc3339_to_time_us("2013-12-01T00:00:00Z")
    assert time_flag_us("2013-12-01T06:30:00Z", "--end") == rfc3339_to_time_us("2013-12-01T06:30:00Z")
    assert time_flag_us("2013-12-01T06:30:00+01:00", "--end") == rfc3339_to_time_us("2013-12-01T05:30:00Z")
    assert time_flag_us("2013-12-01T06:30:00", "--end") == rfc3339_to_time_us("2013-12-01T06:30:00Z")  # UTC
    assert time_flag_us(None, "--end") is None
    with pytest.raises(UsageError, match="--start: expected a UTC date"):
        time_flag_us("yesterday", "--start")


@pytest.mark.parametrize("argv, message", [
    ([], "--model is required"),
    (["--model", "m"], "exactly one of --output"),
    (["--model", "m", "--output", "o", "--predictions_table", "p:d.t"], "exactly one of --output"),
    (["--model", "m", "--predictions_table", "p:d.t"], "needs --dead_letter_table"),
    (["--model", "m", "--output", "o", "--start", "2013-12-02", "--end", "2013-12-01"], "must be after --start"),
])
def test_usage_errors_say_what_to_give(argv, message):
    with pytest.raises(UsageError, match=message):
        options = predict.PredictOptions(argv)
        predict._check_options(options)
        time_range_us(options.start, options.end)


def _signature_on_batch_examples(data_dir, version_dir) -> dict[str, float]:
    """The batch job's examples (label included: the signature ignores it) scored by the SavedModel directly."""
    serve = tf.saved_model.load(str(version_dir / "saved_model")).signatures["serving_default"]
    reference = {}
    for split in SPLITS:
        for records in tf.data.TFRecordDataset(split_files(str(data_dir), split), compression_type="GZIP").batch(256):
            ids = tf.io.parse_example(records, {"event_id": tf.io.FixedLenFeature([], tf.string)})["event_id"]
            reference.update((i.decode(), float(v)) for i, v in zip(ids.numpy(),
                                                                     serve(examples=records)["prediction"].numpy()))
    return reference


def _requests_in_range(start: str, end: str) -> dict[str, Event]:
    start_us, end_us = rfc3339_to_time_us(start), rfc3339_to_time_us(end)
    events = slice_events(load_spec("flights"), flights_lines(lambda month, day: (month, day) in DAYS))
    return {e.event_id: e for e in events if e.role == "request" and start_us <= e.time_us < end_us}


@pytest.fixture(scope="module")
def scored(flights_batch, trained_model, tmp_path_factory):
    """predict on the batch fixture's CSV (its bad rows included), as NDJSON files."""
    _, version_dir = trained_model
    output = tmp_path_factory.mktemp("predict")
    summary = predict.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--model", str(version_dir),
                           "--input", str(flights_batch["output"].parent / "flights.csv"),
                           "--start", START, "--end", END, "--output", str(output)])
    rows = [json.loads(line) for path in sorted((output / "predictions").glob("predictions-*.ndjson"))
            for line in path.read_text().splitlines()]
    dead = [json.loads(line) for path in sorted((output / "dead_letters").glob("*.ndjson"))
            for line in path.read_text().splitlines()]
    return {"summary": summary, "rows": rows, "dead": dead, "output": output, "version_dir": version_dir}


@pytest.mark.slow
def test_every_request_in_range_gets_exactly_one_prediction_equal_to_the_signature_on_the_training_example(
        scored, flights_batch):
    rows, version_dir = scored["rows"], scored["version_dir"]
    expected = _requests_in_range(START, END)
    assert len(expected) > 500
    assert sorted(row["event_id"] for row in rows) == sorted(expected)  # each once, none outside the range
    reference = _signature_on_batch_examples(flights_batch["output"], version_dir)
    by_id = {row["event_id"]: row for row in rows}
    compared = [event_id for event_id in expected if event_id in reference]
    # The batch job writes only labeled requests; scoring needs no label: the rest are cancelled flights.
    assert len(expected) - len(compared) == sum(1 for e in expected.values() if e.fields["dep_delay"] is None)
    assert len(compared) > 500
    for event_id in compared:
        assert by_id[event_id]["prediction"] == pytest.approx(reference[event_id], rel=1e-5, abs=1e-5), event_id
    assert {(row["model_version"], row["source"], row["spec_fingerprint"]) for row in rows} == {
        (version_dir.name, "batch", load_spec("flights").fingerprint)}
    assert all(rfc3339_to_time_us(row["event_time"]) == expected[row["event_id"]].time_us for row in rows)


@pytest.mark.slow
def test_bad_records_are_dead_letters_with_their_reason_and_the_counts_add_up(scored):
    summary, dead = scored["summary"], scored["dead"]
    assert len(dead) == len(BAD_ROWS)
    for letter in dead:
        assert letter["stage"] == "parse" and BAD_ROWS[letter["raw"]] in letter["reason"], letter
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["predictions"] == summary["requests_in_range"] == len(scored["rows"])
    assert summary["requests_in_range"] + summary["requests_outside_range"] == summary["requests"]
    assert summary["dead_letters"] == {"parse": len(BAD_ROWS), "duplicate": 0, "inference": 0}
    written = json.loads((scored["output"] / "summary.json").read_text())
    assert written["predictions"] == summary["predictions"]


@pytest.mark.slow
def test_parquet_holds_the_same_predictions(scored, flights_batch, tmp_path):
    import pyarrow.parquet as pq

    output = tmp_path / "parquet"
    summary = predict.run(["--runner", "DirectRunner", "--direct_num_workers", "1",
                           "--model", str(scored["version_dir"]), "--input", str(flights_batch["good_csv"]),
                           "--start", START, "--end", END, "--output", str(output), "--output_format", "parquet"])
    table = pq.read_table(sorted((output / "predictions").glob("*.parquet")))
    assert table.schema == predict.parquet_schema()
    got = {row["event_id"]: row for row in table.to_pylist()}
    assert len(got) == summary["predictions"] == len(scored["rows"])
    for row in scored["rows"]:
        assert got[row["event_id"]]["prediction"] == pytest.approx(row["prediction"], rel=1e-5, abs=1e-5)
        assert int(got[row["event_id"]]["event_time"].timestamp() * 1e6) == rfc3339_to_time_us(row["event_time"])


class _FailingOn(SavedModelHandler):
    """A test double for a fault the real model cannot be made to raise on
    valid examples (an out-of-memory, a broken accelerator): a batch holding
    the marked request fails. Everything else is the real handler and model."""

    def __init__(self, model_path, spec, marked: str):
        super().__init__(model_path, spec)
        self._marked = marked

    def run_inference(self, batch, model, inference_args=None):
        if any(key.event_id == self._marked for key in batch.keys):
            raise RuntimeError("the accelerator fell over")
        return super().run_inference(batch, model, inference_args)


def test_a_failed_model_call_is_a_dead_letter_per_request_of_its_batch(trained_model):
    spec = load_spec("flights")
    _, version_dir = trained_model
    saved_model = str(version_dir / "saved_model")
    fields = {"carrier": "UA", "origin": "EWR", "dest": "ORD", "distance": 719.0, "hour": 8, "minute": 0,
              "month": 1, "day_of_week": 1, "tailnum": "N1", "dep_delay": 3.0}
    events = [Event(f"20130101-UA{i}-EWR", "request", 1_357_000_000_000_000 + i * HOUR_US, dict(fields)) for i in range(20)]
    records = [RawRecord(f"test:{i}", event_to_json(e), "json") for i, e in enumerate(events)]
    with TestPipeline() as pipeline:
        outputs = predict.build(pipeline | beam.Create(records), spec, saved_model, inference_batch_size=4,
                                handler=_FailingOn(saved_model, spec, marked="20130101-UA7-EWR"))

        def check(pair):
            rows, letters = pair
            failed = {letter.source.removeprefix("event:") for letter in letters}
            assert "20130101-UA7-EWR" in failed and all(letter.stage == "inference" for letter in letters)
            assert all("the accelerator fell over" in letter.reason for letter in letters)
            assert len(failed) <= 4  # only the marked request's batch
            assert sorted({row["event_id"] for row in rows} | failed) == sorted(e.event_id for e in events)
            assert not {row["event_id"] for row in rows} & failed  # exactly one each

        rows = outputs["predictions"] | "Rows" >> beam.combiners.ToList()
        letters = outputs["dead_letters"] | "Letters" >> beam.combiners.ToList()
        joined = (pipeline | "One" >> beam.Create([None])
                  | beam.Map(lambda _, r, d: (r, d), beam.pvalue.AsSingleton(rows), beam.pvalue.AsSingleton(letters)))
        assert_that(joined, lambda pairs: [check(pair) for pair in pairs])


def test_a_missing_input_is_refused_before_the_job_starts(trained_model, tmp_path):
    _, version_dir = trained_model
    with pytest.raises(FileNotFoundError):
        predict.run(["--runner", "DirectRunner", "--model", str(version_dir), "--input", str(tmp_path / "none.ndjson"),
                     "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_spec_is_refused_before_the_job_starts(taxi_model, tmp_path):
    _, taxi_dir = taxi_model
    with pytest.raises(SpecMismatch):
        predict.run(["--runner", "DirectRunner", "--model", str(taxi_dir), "--output", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_predictions_go_to_the_predictions_table_marked_batch(bigquery_emulator, trained_model, tmp_path):
    from beam_app.bigquery.client import bigquery_client

    _, version_dir = trained_model
    expected = _requests_in_range("2013-12-01T00:00:00Z", "2013-12-01T04:00:00Z")
    source = tmp_path / "events.ndjson"
    events = slice_events(load_spec("flights"), flights_lines(lambda month, day: (month, day) in DAYS))
    source.write_text("".join(event_to_json(e) + "\n" for e in events) + "{not json\n")
    argv = ["--runner", "DirectRunner", "--direct_num_workers", "1", "--model", str(version_dir),
            "--input", str(source), "--start", "2013-12-01", "--end", "2013-12-01T04:00:00Z",
            "--predictions_table", "test-project:backfill.predictions",
            "--dead_letter_table", "test-project:backfill.dead_letters", "--bigquery_endpoint", bigquery_emulator.endpoint]
    with pytest.raises(UsageError, match="backfill.predictions does not exist: run with --create_tables"):
        predict.run(argv)
    summary = predict.run(argv + ["--create_tables"])
    client = bigquery_client("test-project", bigquery_emulator.endpoint)
    rows = [dict(row) for row in client.query("SELECT * FROM `test-project.backfill.predictions`").result()]
    assert sorted(row["event_id"] for row in rows) == sorted(expected) and len(rows) == summary["predictions"]
    assert {(row["source"], row["model_version"]) for row in rows} == {("batch", version_dir.name)}
    (letter,) = [dict(row) for row in client.query("SELECT * FROM `test-project.backfill.dead_letters`").result()]
    assert (letter["stage"], letter["payload"]) == ("parse", "{not json")
    # Counted once (by the job, not again by the table write), so the counts add up as with --output.
    assert summary["dead_letters"]["parse"] == 1 and all(summary["checks"].values()), summary["checks"]
