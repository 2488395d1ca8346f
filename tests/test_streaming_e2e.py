"""The streaming job end to end on the real emulators: events published to
Pub/Sub, predictions read back from BigQuery, and parity with the batch
branch on the very events the publisher wrote."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.emulators import tables_exist, wait_until
from tests.flights_slice import flights_lines

tf = pytest.importorskip("tensorflow")

from beam_app import batch, publish, streaming  # noqa: E402
from beam_app.bigquery_client import bigquery_client  # noqa: E402
from models.data import split_files  # noqa: E402
from transforms.spec import SPLITS  # noqa: E402

PROJECT = "test-project"
EVENTS = 400  # about 200 requests: the streaming DirectRunner answers about 7 a second here

# Malformed messages published next to the events, with a piece of the reason each must get.
MALFORMED = [
    (b"{not json", {}, "not valid JSON"),
    (b"\xff\xfe binary", {}, "not valid UTF-8"),
    (json.dumps({"event_id": "20131130-UA1-EWR", "role": "request", "event_time": "2013-11-30T10:00:00Z",
                 "carrier": "UA", "origin": "BOS", "dest": "ORD", "hour": 5, "minute": 0, "month": 11,
                 "day_of_week": 5}).encode(), {}, "origin: unknown value 'BOS'"),
    # Valid, but stamped (event_time attribute = now) at another time than its payload says.
    (json.dumps({"event_id": "20131130-UA2-EWR", "role": "request", "event_time": "2013-11-30T10:00:00Z",
                 "carrier": "UA", "origin": "EWR", "dest": "ORD", "distance": 719.0, "hour": 5, "minute": 0,
                 "month": 11, "day_of_week": 5}).encode(), {}, "event_time: the payload says 2013-11-30T10:00:00Z"),
]


def _publish_malformed(topic: str) -> None:
    from google.cloud import pubsub_v1

    from transforms.events import time_us_to_rfc3339

    publisher = pubsub_v1.PublisherClient()
    now = time_us_to_rfc3339(int(time.time() * 1000) * 1000)
    for data, attributes, _ in MALFORMED:
        publisher.publish(topic, data, event_time=now, **attributes).result()


def _rows(client, sql: str) -> list[dict]:
    return [dict(row.items()) for row in client.query(sql).result()]


@pytest.mark.slow
def test_published_events_get_exactly_one_prediction_each_equal_to_batch(
        pubsub_emulator, bigquery_emulator, trained_model, tmp_path):
    from google.cloud import pubsub_v1

    _, version_dir = trained_model
    topic = f"projects/{PROJECT}/topics/events"
    subscription = f"projects/{PROJECT}/subscriptions/streaming-job"
    publisher = pubsub_v1.PublisherClient()
    publisher.create_topic(name=topic)
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    predictions_table, dead_letter_table = f"{PROJECT}:live.predictions", f"{PROJECT}:live.dead_letters"
    source = tmp_path / "slice.csv"
    source.write_text("\n".join(flights_lines(lambda month, day: (month, day) == (11, 30))) + "\n")
    recorded = tmp_path / "published.ndjson"

    stop, failed, summary = threading.Event(), [], {}

    def job():
        try:
            summary.update(streaming.run([
                "--runner", "DirectRunner", "--input_subscription", subscription, "--model", str(version_dir.parent),
                "--predictions_table", predictions_table, "--dead_letter_table", dead_letter_table,
                "--create_tables", "--bigquery_endpoint", bigquery_emulator.endpoint], stop=stop))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            failed.append(err)

    def job_failed():
        if failed:
            raise failed[0]

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    wait_until(lambda: tables_exist(client, "live"), 60, "the job to create its tables", job_failed)
    published = publish.run(["--topic", topic, "--input", str(source), "--limit", str(EVENTS), "--rebase_to_now",
                             "--rate", "100", "--record", str(recorded)])
    _publish_malformed(topic)
    assert published["published"] == EVENTS

    events = [json.loads(line) for line in recorded.read_text().splitlines()]
    requests = {event["event_id"] for event in events if event["role"] == "request"}

    def all_predicted():
        rows = _rows(client, "SELECT event_id, COUNT(*) AS n FROM `test-project.live.predictions` GROUP BY event_id")
        return rows if sum(row["n"] for row in rows) >= len(requests) else None

    wait_until(all_predicted, 180, f"{len(requests)} predictions", job_failed)
    dead = wait_until(lambda: (rows := _rows(client, "SELECT * FROM `test-project.live.dead_letters`")) and
                 len(rows) >= len(MALFORMED) and rows, 60, "the dead letters", job_failed)
    time.sleep(3)  # anything extra (a duplicate) would arrive now
    stop.set()
    thread.join(60)
    assert not failed and not thread.is_alive()

    # Every request got exactly one prediction, and nothing else did.
    counts = _rows(client, "SELECT event_id, COUNT(*) AS n FROM `test-project.live.predictions` GROUP BY event_id")
    assert {row["event_id"] for row in counts} == requests
    assert all(row["n"] == 1 for row in counts)
    streamed = {row["event_id"]: row for row in _rows(client, "SELECT * FROM `test-project.live.predictions`")}
    assert {row["model_version"] for row in streamed.values()} == {version_dir.name}

    # Parity: the batch branch on the file the publisher wrote, scored by the same SavedModel.
    output = tmp_path / "batch"
    batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--input", str(recorded),
               "--input_format", "json", "--output", str(output)])
    serve = tf.saved_model.load(str(version_dir / "saved_model")).signatures["serving_default"]
    reference = {}
    for split in SPLITS:
        for records in tf.data.TFRecordDataset(split_files(str(output), split), compression_type="GZIP").batch(256):
            ids = tf.io.parse_example(records, {"event_id": tf.io.FixedLenFeature([], tf.string)})["event_id"]
            values = serve(examples=records)["prediction"].numpy()
            reference.update((i.decode(), float(v)) for i, v in zip(ids.numpy(), values))
    assert len(reference) > 100 and set(reference) <= requests  # labeled requests (cancelled flights have none)
    mismatched = {event_id: (streamed[event_id]["prediction"], value) for event_id, value in reference.items()
                  if streamed[event_id]["prediction"] != pytest.approx(value, rel=1e-5, abs=1e-5)}
    assert not mismatched, f"{len(mismatched)} of {len(reference)} predictions differ from batch: " \
                           f"{list(mismatched.items())[:5]}"

    # Malformed messages: dead letters with the reason, payload and attributes; counted in the summary.
    parse_letters = sorted((row for row in dead if row["stage"] == "parse"), key=lambda row: row["error"])
    assert len(parse_letters) == len(MALFORMED)
    for (data, _, reason) in MALFORMED:
        (letter,) = [row for row in parse_letters if reason in row["error"]]
        assert letter["payload"] == data.decode("utf-8", errors="replace")
        assert "event_time" in json.loads(letter["attributes"])
    assert summary["predictions"] == len(requests)
    assert summary["dead_letters"] == {"parse": len(MALFORMED)}

