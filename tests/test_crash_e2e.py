"""A streaming job killed with SIGKILL mid-stream, on the real emulators, and
started again on the same subscription: every request gets a prediction, or
the completeness check of the consistency job reports it missing; none is
predicted twice, none is reported twice, none is both.

The streaming DirectRunner acks a message when it pulls it, so what the killed
job held (requests waiting for the watermark in its release buffer, rows not
yet inserted) is lost; what it had not pulled is redelivered to the new job.
How many are lost depends on when the kill lands: the test does not count on
any, it checks that each one is accounted for. Events published once the new
job has started are answered by it whatever the machine's load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.emulators import tables_exist, wait_until

tf = pytest.importorskip("tensorflow")

from beam_app import consistency, publish  # noqa: E402
from beam_app.bigquery.client import bigquery_client  # noqa: E402
from tests.test_streaming_e2e import _rows  # noqa: E402
from transforms.events import rfc3339_to_time_us, time_us_to_rfc3339  # noqa: E402

PROJECT = "test-project"
ROOT = Path(__file__).resolve().parents[1]
EVENTS, RATE = 200, 10  # 20 s of events; the kill lands in the middle
LATER_EVENTS = 40  # published once the second job has started


def _start_job(argv: list[str], log: Path) -> subprocess.Popen:
    """`python -m beam_app.streaming` in a process of its own (a SIGKILL must not take the test
    with it), with the emulators' environment; its output goes to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "beam_app.streaming", *argv], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=os.environ.copy())


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _alive(process: subprocess.Popen, log: Path):
    def check() -> None:
        if process.poll() is not None:
            raise AssertionError(f"the streaming job exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    return check


def _check_completeness(predictions: str, history: Path, bigquery_emulator, output: Path) -> tuple[dict, list[dict]]:
    """The consistency job's completeness check, ending now with no lateness allowed: run once
    the job has answered all it holds. Returns its summary and the missing requests it lists."""
    summary = consistency.run([
        "--runner", "DirectRunner", "--predictions", predictions, "--input", str(history),
        "--end", time_us_to_rfc3339(int(time.time() * 1e6)), "--allowed_lateness_s", "0",
        "--bigquery_endpoint", bigquery_emulator.endpoint, "--output", str(output)])
    return summary, [json.loads(line) for path in output.glob("missing-*.ndjson") for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_job_killed_mid_stream_and_restarted_loses_no_request_in_silence(
        pubsub_emulator, bigquery_emulator, trained_model, tmp_path):
    from google.cloud import pubsub_v1

    from tests.flights_slice import flights_lines

    _, version_dir = trained_model
    source = tmp_path / "slice.csv"
    source.write_text("\n".join(flights_lines(lambda month, day: (month, day) == (11, 30))) + "\n")
    topic, subscription = f"projects/{PROJECT}/topics/crash-events", f"projects/{PROJECT}/subscriptions/crash-job"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    predictions = f"{PROJECT}:crash.predictions"
    argv = ["--runner", "DirectRunner", "--input_subscription", subscription, "--model", str(version_dir.parent),
            "--predictions_table", predictions, "--dead_letter_table", f"{PROJECT}:crash.dead_letters",
            "--create_tables", "--bigquery_endpoint", bigquery_emulator.endpoint]
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    predicted = lambda: [row["event_id"] for row in _rows(client, f"SELECT event_id FROM `{PROJECT}.crash.predictions`")]  # noqa: E731,E501
    sent, log = tmp_path / "published.ndjson", tmp_path / "job.log"

    first = _start_job(argv, log)
    second = third = None
    try:
        wait_until(lambda: tables_exist(client, "crash"), 120, "the job's tables", _alive(first, log))
        published = {}
        publisher = threading.Thread(target=lambda: published.update(publish.run([
            "--topic", topic, "--input", str(source), "--start", "2013-11-30T12:00:00", "--limit", str(EVENTS),
            "--rebase_to_now", "--rate", str(RATE), "--record", str(sent)])), daemon=True)
        publisher.start()
        # Mid-stream: once the job has answered some requests, while more are in flight.
        wait_until(lambda: len(predicted()) >= 10, 120, "the first predictions", _alive(first, log),
                   progress=lambda: len(predicted()))
        first.kill()  # SIGKILL: no stop, no flush
        assert first.wait(30) == -signal.SIGKILL
        killed_at_us = int(time.time() * 1e6)
        before_restart = set(predicted())

        second = _start_job(argv, log)
        publisher.join(EVENTS / RATE * 3 + 60)
        assert not publisher.is_alive() and published["published"] == EVENTS
        # Then flights of the evening, after the kill whatever the machine's load: pulled by the second
        # job alone, each must be answered. It releases in event time order, so the earlier requests
        # it pulled are answered by then.
        later = publish.run(["--topic", topic, "--input", str(source), "--start", "2013-11-30T20:00:00",
                             "--limit", str(LATER_EVENTS), "--rebase_to_now", "--rate", str(RATE),
                             "--record", str(tmp_path / "later.ndjson")])
        assert later["published"] == LATER_EVENTS
        after_kill = {event["event_id"] for event in _events(tmp_path / "later.ndjson") if event["role"] == "request"}
        sent.write_text(sent.read_text() + (tmp_path / "later.ndjson").read_text())
        events = _events(sent)
        assert len({(event["event_id"], event["role"]) for event in events}) == EVENTS + LATER_EVENTS
        requests = {event["event_id"]: event["event_time"] for event in events if event["role"] == "request"}
        assert after_kill and all(rfc3339_to_time_us(requests[i]) > killed_at_us for i in after_kill)
        wait_until(lambda: after_kill <= set(predicted()), 180, "the requests published after the kill",
                   _alive(second, log), progress=lambda: len(predicted()))
        second.send_signal(signal.SIGTERM)  # the graceful stop: what it holds reaches the table, then its summary
        assert second.wait(60) == 0
        answered = predicted()
        assert len(answered) == len(set(answered)), "a request was predicted twice"
        assert set(answered) <= set(requests)
        assert before_restart <= set(answered)

        # The completeness check, once the job has answered all it holds: nothing may still be in flight.
        summary, reported = _check_completeness(predictions, sent, bigquery_emulator, tmp_path / "check")
        missing = [record["event_id"] for record in reported]
        assert len(missing) == len(set(missing)), "a request was reported twice"
        assert not set(missing) & set(answered), "a request was both predicted and reported missing"
        assert set(missing) | set(answered) == set(requests), "a request was lost in silence"
        assert all(record["event_time"] == time_us_to_rfc3339(rfc3339_to_time_us(requests[record["event_id"]]))
                   and record["overdue"] for record in reported)
        complete = summary["completeness"]
        assert (complete["requests"], complete["answered"], complete["without_prediction"],
                complete["without_prediction_overdue"]) == (len(requests), len(answered), len(missing), len(missing))
        assert summary["passed"] == (not missing)

        # The repair the check's failure names: the missing requests published again, as they were
        # (within the allowed lateness), to a job on the same subscription; then nothing is missing.
        if missing:
            third = _start_job(argv, log)
            again = publish.run(["--topic", topic, "--input", str(tmp_path / "check" / "missing-*.ndjson"),
                                 "--input_format", "json", "--rate", "0"])
            assert again["published"] == len(missing)
            wait_until(lambda: set(requests) <= set(predicted()), 180, "the republished requests",
                       _alive(third, log), progress=lambda: len(predicted()))
            third.send_signal(signal.SIGTERM)
            assert third.wait(60) == 0
            summary, reported = _check_completeness(predictions, sent, bigquery_emulator, tmp_path / "again")
            assert not reported and summary["passed"] and summary["completeness"]["answered"] == len(requests)
            assert summary["completeness"]["answered_more_than_once"] == 0
    finally:
        for process in (first, second, third):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)

    # The restarted job's own summary says what it read and answered.
    assert "streaming job stopped after" in log.read_text() and "messages; accepted" in log.read_text()
    print(f"SIGKILL mid-stream and restart on the same subscription: {len(requests)} requests, "
          f"{len(answered)} predicted once, {len(missing)} lost with the killed job, reported missing, "
          f"published again and answered")
