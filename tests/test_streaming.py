"""The streaming job's command line and start-up checks, how it stops
(beam_app/serving/stop.py), and its BigQuery writes (on the real BigQuery
emulator); the whole job end to end is in test_streaming_e2e.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import threading

import apache_beam as beam
import pytest
import yaml

from beam_app import streaming
from beam_app.bigquery.client import EndpointBigQueryClient, bigquery_client, ensure_table
from beam_app.bigquery.tables import DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, events_schema, served_features_schema
from beam_app.bigquery.write import write_outputs
from beam_app.common.errors import EXIT_USAGE, UsageError
from beam_app.serving import stop
from transforms.events import DeadLetter
from transforms.spec import load_spec

PROJECT = "test-project"


def test_options_say_what_is_missing():
    with pytest.raises(UsageError, match="exactly one of --input_subscription"):
        streaming._check_options(streaming.StreamingOptions(["--model", "m"]))
    with pytest.raises(UsageError, match="--predictions_table is required"):
        streaming._check_options(streaming.StreamingOptions(
            ["--input_topic", "projects/p/topics/t", "--model", "m", "--dead_letter_table", "p:d.t"]))
    with pytest.raises(UsageError, match="--key_shards must be 0"):
        streaming.key_shards(streaming.StreamingOptions(["--key_shards", "-1"]))
    assert streaming.key_shards(streaming.StreamingOptions(["--runner", "DirectRunner"])) == 1
    assert streaming.key_shards(streaming.StreamingOptions(["--runner", "DataflowRunner"])) is None
    assert streaming.key_shards(streaming.StreamingOptions(["--runner", "DirectRunner", "--key_shards", "0"])) is None


FULL = ["--input_topic", "projects/p/topics/t", "--model", "m", "--predictions_table", "p:d.p",
        "--dead_letter_table", "p:d.t"]


def test_id_attribute_and_a_missing_bootstrap_are_refused_at_start_with_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="--id_attribute works on Dataflow only: .* Leave it out here"):
        streaming._check_options(streaming.StreamingOptions([*FULL, "--id_attribute", "message_key"]))
    streaming._check_options(streaming.StreamingOptions([*FULL, "--id_attribute", "message_key",
                                                         "--runner", "DataflowRunner"]))
    with pytest.raises(UsageError, match="--bootstrap_input .* matches no file"):
        streaming._check_options(streaming.StreamingOptions([*FULL, "--bootstrap_input", str(tmp_path / "*.ndjson")]))


@pytest.mark.parametrize("flags", [["--max_cache_memory_usage_mb", "100"], ["--experiments", "state_cache_size=50"]])
def test_beams_state_cache_is_refused_with_why(flags):
    with pytest.raises(UsageError, match="leave Beam's state cache off .* about 15 times slower"):
        streaming._check_options(streaming.StreamingOptions([*FULL, *flags]))
    streaming._check_options(streaming.StreamingOptions([*FULL, "--max_cache_memory_usage_mb", "0"]))


@pytest.mark.parametrize("fraction", ["0", "-0.5", "1.01"])
def test_the_served_features_fraction_is_a_share_above_0_and_at_most_1(fraction):
    with pytest.raises(UsageError, match="--served_features_fraction is a share of requests"):
        streaming._check_options(streaming.StreamingOptions([*FULL, "--served_features_fraction", fraction]))
    streaming._check_options(streaming.StreamingOptions([*FULL, "--served_features_fraction", "0.25"]))


def test_a_table_named_twice_is_refused():
    with pytest.raises(UsageError, match="each table flag needs a table of its own"):
        streaming._check_options(streaming.StreamingOptions([*FULL, "--served_features", "p:d.p"]))


@pytest.mark.parametrize("old,new", [("--served_features_table", "--served_features"),
                                     ("--served_features_rate", "--served_features_fraction")])
def test_an_old_or_mistyped_flag_is_refused_naming_the_flag_meant(old, new):
    with pytest.raises(UsageError, match=f"unknown flag {old}; did you mean {new}\\?"):
        streaming.run([*FULL, old, "1"])


@pytest.fixture(scope="module")
def tensorflow_imported():
    """main() imports TensorFlow (for SpecMismatch), which sets environment variables
    the first time: before the test, which must leave os.environ as it found it."""
    import models.export  # noqa: F401


def test_main_exits_2_on_a_usage_error_naming_the_command(tensorflow_imported, monkeypatch, capsys):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # what main sets first
    monkeypatch.setattr(sys, "argv", ["streaming", "--model", "m"])
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        streaming.main()
    assert exited.value.code == EXIT_USAGE
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # Ctrl-C works again
    assert capsys.readouterr().err.startswith("python -m beam_app.streaming: error: give exactly one of")


def test_help_lists_the_jobs_flags(monkeypatch, capsys):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(sys, "argv", ["streaming", "--help"])
    streaming.main()
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m beam_app.streaming")
    assert "--served_features " in out and "--served_features_fraction" in out and "--spec" in out


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
    assert stop.settle(lambda: next(rows), quiet_s=1.0, max_s=2.5, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(1.5)  # the last change at 0.5 s, then 1 s of quiet
    clock = _Clock()
    growing = iter(range(100))  # a job that never settles
    assert not stop.settle(lambda: next(growing), quiet_s=1.0, max_s=2.5, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(2.5)


class _StopAt:
    """A stop Event on the fake clock: wait(timeout) sleeps on it, and says stop from `at` on."""

    def __init__(self, clock: _Clock, at: float = float("inf")):
        self.clock, self.at, self.waits = clock, at, 0

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        self.clock.sleep(timeout)
        return self.clock() >= self.at


def test_the_wait_ends_at_the_duration_or_the_stop_and_reports_progress(caplog):
    counts = {"predictions": 7, "dead_letters": {"parse": 2}}
    clock = _Clock()
    with caplog.at_level(logging.INFO):
        stop.wait_for_stop(65, 0.0, _StopAt(clock), lambda: counts, every_s=30, clock=clock)
    assert clock.now == pytest.approx(65)
    assert [r.getMessage() for r in caplog.records] == [
        "running 30 s: 7 predictions, dead letters {'parse': 2}",
        "running 60 s: 7 predictions, dead letters {'parse': 2}"]

    clock = _Clock()
    stop.wait_for_stop(0, 0.0, _StopAt(clock, at=12.0), lambda: counts, clock=clock)  # 0: until stopped
    assert clock.now == pytest.approx(12.0)


def test_a_count_that_fails_is_a_warning_and_the_job_goes_on(caplog):
    def failing():
        raise TimeoutError("BigQuery did not answer")

    clock = _Clock()
    stop.wait_for_stop(31, 0.0, _StopAt(clock), failing, every_s=30, clock=clock)
    assert clock.now == pytest.approx(31)
    assert ["running 30 s; could not count the rows written: BigQuery did not answer"] == [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_progress_line_says_no_dead_letters_as_0():
    assert stop.progress_line(29.6, {"predictions": 3, "dead_letters": {}}) == \
        "running 30 s: 3 predictions, dead letters 0"


def test_a_first_signal_asks_to_stop_and_a_second_stops_at_once():
    event = threading.Event()
    handler = stop.signal_handler(event)
    handler(signal.SIGTERM, None)
    assert event.is_set()
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)


def test_the_signal_handlers_are_the_jobs_only_while_it_runs():
    before, event = signal.getsignal(signal.SIGTERM), threading.Event()
    with stop.stop_on_signals(event, signums=(signal.SIGTERM,)):
        signal.raise_signal(signal.SIGTERM)
        assert event.is_set()
    assert signal.getsignal(signal.SIGTERM) == before


class _Result:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def test_the_pipeline_is_cancelled_after_the_settle_or_a_second_interrupt():
    result, stopped = _Result(), threading.Event()
    stopped.set()
    stop.stop_when_settled(result, lambda: 1, duration_s=0, started=0.0, stop=stopped)  # settles in 1 s
    assert result.cancelled.wait(5)

    def interrupted():
        raise KeyboardInterrupt

    result = _Result()
    stop.stop_when_settled(result, interrupted, duration_s=0, started=0.0, stop=stopped)
    assert result.cancelled.wait(5)


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
    assert done.returncode == EXIT_USAGE
    assert "python -m beam_app.streaming: error: model" in done.stderr
    assert f"was trained on spec {flights_spec.fingerprint[:12]}" in done.stderr
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
        write_outputs(
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
