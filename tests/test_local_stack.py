"""The local stack the streaming tests and the demo stand on: the real
emulators answer like the services (messages and attributes round-trip;
BigQuery refuses bad rows one by one, with the reason), and Beam's
WriteToBigQuery reaches local-bigquery through EndpointBigQueryClient."""

from __future__ import annotations

import pickle
import socket

import pytest

from beam_app.bigquery.client import EndpointBigQueryClient, bigquery_client, ensure_table, parse_table_spec
from beam_app.local.stack import BigQueryEmulator, EmulatorError, PortInUse, PubSubEmulator, free_port

PROJECT = "test-project"
SCHEMA = [
    {"name": "event_id", "type": "STRING", "mode": "REQUIRED", "description": "The event's id."},
    {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
    {"name": "value", "type": "FLOAT64", "mode": "NULLABLE"},
]


def _rows(client, sql: str) -> list[dict]:
    return [dict(row.items()) for row in client.query(sql).result()]


@pytest.mark.parametrize("spec", ["p:d.t", "p.d.t"])
def test_table_specs_in_both_notations(spec):
    assert parse_table_spec(spec) == ("p", "d", "t")


@pytest.mark.parametrize("spec", ["d.t", "p:d", "p:d.t.x", "p:.t"])
def test_incomplete_table_specs_are_refused(spec):
    with pytest.raises(ValueError, match="project:dataset.table"):
        parse_table_spec(spec)


def test_the_client_pickles_as_project_and_endpoint_and_builds_its_clients_on_use():
    client = EndpointBigQueryClient(PROJECT, "http://127.0.0.1:9/")
    assert client.tables is client.apitools.tables and client.cloud.project == PROJECT
    copy = pickle.loads(pickle.dumps(client))
    assert (copy.project, copy.endpoint, copy._apitools, copy._cloud) == (PROJECT, "http://127.0.0.1:9", None, None)
    assert copy.apitools.url == "http://127.0.0.1:9/bigquery/v2/"
    assert copy.cloud._connection.API_BASE_URL == "http://127.0.0.1:9"


def test_a_missing_local_bigquery_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_BIGQUERY_BIN", str(tmp_path / "local-bigquery"))
    with pytest.raises(EmulatorError, match="make venv-bq"):
        BigQueryEmulator().start()


def test_a_port_in_use_is_refused_before_starting():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        with pytest.raises(EmulatorError, match=f"port {listener.getsockname()[1]} is in use"):
            PubSubEmulator(listener.getsockname()[1]).start()


@pytest.mark.slow
def test_a_port_it_picked_that_another_process_takes_first_is_picked_again(monkeypatch):
    """Two test workers may pick the same free port before either binds it: the emulator that
    cannot bind starts again on new ports, and is not fooled by the other one answering there."""
    from beam_app.local import stack

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: free to a probe, taken for the emulator's bind
        port = taken.getsockname()[1]
        picks = [port]
        monkeypatch.setattr(stack, "free_port", lambda: picks.pop() if picks else free_port())
        with PubSubEmulator() as emulator:
            assert emulator.port != port
            emulator.check_running()
            assert f"listening on {emulator.port}" in emulator.log_tail()


@pytest.mark.slow
def test_a_port_it_was_given_that_is_taken_fails_at_once_with_the_bind_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"(?s)could not listen on its ports \\[{port}\\].*log tail"):
            PubSubEmulator(port, start_timeout_s=60).start()


def test_an_emulator_that_dies_at_start_fails_with_its_log(monkeypatch, tmp_path):
    fake = tmp_path / "local-bigquery"
    fake.write_text("#!/bin/sh\necho 'no such thing' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LOCAL_BIGQUERY_BIN", str(fake))
    with pytest.raises(EmulatorError, match=r"(?s)exited with code 3.*log tail.*no such thing"):
        BigQueryEmulator(start_timeout_s=10).start()


@pytest.mark.slow
def test_pubsub_messages_round_trip_with_their_attributes(pubsub_emulator):
    from google.cloud import pubsub_v1

    topic, subscription = f"projects/{PROJECT}/topics/round-trip", f"projects/{PROJECT}/subscriptions/round-trip"
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    sent = {f"message {i}".encode(): {"event_time": f"2024-01-02T03:04:0{i}Z", "n": str(i)} for i in range(3)}
    for data, attributes in sent.items():
        publisher.publish(topic, data, **attributes).result(timeout=30)

    received = {}
    for _ in range(20):  # a pull may return fewer than are waiting
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=30)
        for message in response.received_messages:
            received[message.message.data] = dict(message.message.attributes)
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
        if len(received) >= len(sent):
            break
    assert received == sent


@pytest.mark.slow
def test_local_bigquery_creates_tables_idempotently_and_refuses_bad_rows_one_by_one(bigquery_emulator):
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    table = f"{PROJECT}:direct.events"
    ensure_table(client, table, SCHEMA)
    created = ensure_table(client, table, SCHEMA)
    assert [(field.name, field.mode) for field in created.schema] == [
        ("event_id", "REQUIRED"), ("event_time", "REQUIRED"), ("value", "NULLABLE")]
    assert created.schema[0].description == "The event's id."

    rows = [{"event_id": "good", "event_time": "2024-01-02T03:04:05.123456Z", "value": 1.5},
            {"event_time": "2024-01-02T03:04:05Z", "value": 2.0},
            {"event_id": "unknown", "event_time": "2024-01-02T03:04:05Z", "colour": "red"}]
    errors = client.insert_rows_json(f"{PROJECT}.direct.events", rows, skip_invalid_rows=True)
    assert {error["index"]: [(e["reason"], e["location"], e["message"]) for e in error["errors"]]
            for error in errors} == {
        1: [("invalid", "event_id", "Missing required field: event_id.")],
        2: [("invalid", "colour", "no such field: colour.")]}

    assert _rows(client, f"SELECT event_id, FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%E6SZ', event_time) AS event_time, value "
                         f"FROM `{PROJECT}.direct.events` WHERE event_time > TIMESTAMP('2024-01-02T03:04:05Z')") == [
        {"event_id": "good", "event_time": "2024-01-02T03:04:05.123456Z", "value": 1.5}]


@pytest.mark.slow
def test_write_to_bigquery_streams_good_rows_and_hands_back_bad_ones(bigquery_emulator):
    import apache_beam as beam
    from apache_beam.io.gcp.bigquery_tools import RetryStrategy
    from apache_beam.testing.util import assert_that, equal_to

    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    table = f"{PROJECT}:beam.events"
    ensure_table(client, table, SCHEMA)
    good = [{"event_id": f"e{i}", "event_time": f"2024-01-02T03:04:0{i}Z", "value": i / 2} for i in range(4)]
    bad = {"event_id": "no-time", "value": 9.0}

    with beam.Pipeline(runner="DirectRunner") as pipeline:
        result = (pipeline
                  | beam.Create([*good, bad])
                  | beam.io.WriteToBigQuery(
                      table, schema={"fields": SCHEMA}, method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
                      insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
                      create_disposition=beam.io.BigQueryDisposition.CREATE_NEVER,
                      test_client=EndpointBigQueryClient(PROJECT, bigquery_emulator.endpoint)))
        failed = result.failed_rows_with_errors | beam.MapTuple(
            lambda destination, row, errors: (destination, row, [(e["reason"], e["location"], e["message"])
                                                                 for e in errors]))
        assert_that(failed, equal_to([
            (f"{PROJECT}:beam.events", bad, [("invalid", "event_time", "Missing required field: event_time.")])]))

    assert _rows(client, f"SELECT event_id, UNIX_SECONDS(event_time) AS seconds, value FROM `{PROJECT}.beam.events` "
                         "ORDER BY event_id") == [
        {"event_id": f"e{i}", "seconds": 1704164640 + i, "value": i / 2} for i in range(4)]
