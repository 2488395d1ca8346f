"""The streaming job end to end on the real emulators: events published to
Pub/Sub, predictions read back from BigQuery, and parity with the batch
branch on the very events the publisher wrote. One flow (`_stream_and_check`)
for every use case: the flights spec and the chicago_taxi spec go through
the same publisher and job, unchanged."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import pytest

from tests.emulators import StreamingJob, tables_exist, wait_until
from tests.flights_slice import flights_lines, weather_lines

tf = pytest.importorskip("tensorflow")

from beam_app import batch, consistency, predict, publish  # noqa: E402
from beam_app.bigquery.client import bigquery_client  # noqa: E402
from models.data import split_files  # noqa: E402
from transforms.events import rfc3339_to_time_us, time_us_to_rfc3339  # noqa: E402
from transforms.feature_layout import feature_groups  # noqa: E402
from transforms.spec import REQUEST, SPLITS, load_spec  # noqa: E402

PROJECT = "test-project"
EVENTS = 400  # about 200 requests: the streaming DirectRunner answers about 7 a second here
TAXI_EVENTS = 120  # about 60 trips of the embedded data: a short run
DUPLICATES = 20  # events published a second time


class Malformed(NamedTuple):
    """A message published before the events, with a piece of the reason its dead letter must give.
    It is stamped with the publish time (event_time attribute) unless `attributes` says otherwise;
    `data` and `attributes` may take that time (RFC 3339, whole ms) to put it in the payload."""

    data: Union[bytes, Callable[[str], bytes]]
    reason: str
    attributes: Optional[Callable[[str], dict]] = None


def _flights_request(event_time: str, event_id: str = "20131130-UA3-EWR") -> bytes:
    return json.dumps({"event_id": event_id, "role": "request", "event_time": event_time, "carrier": "UA",
                       "origin": "EWR", "dest": "ORD", "distance": 719.0, "hour": 5, "minute": 0, "month": 11,
                       "day_of_week": 5}).encode()


MALFORMED = [
    Malformed(b"{not json", "not valid JSON"),
    Malformed(b"\xff\xfe binary", "not valid UTF-8"),
    Malformed(json.dumps({"event_id": "20131130-UA1-EWR", "role": "request", "event_time": "2013-11-30T10:00:00Z",
                          "carrier": "UA", "origin": "BOS", "dest": "ORD", "hour": 5, "minute": 0, "month": 11,
                          "day_of_week": 5}).encode(), "origin: unknown value 'BOS'"),
    # Valid, but stamped (event_time attribute = now) at another time than its payload says.
    Malformed(json.dumps({"event_id": "20131130-UA2-EWR", "role": "request", "event_time": "2013-11-30T10:00:00Z",
                          "carrier": "UA", "origin": "EWR", "dest": "ORD", "distance": 719.0, "hour": 5, "minute": 0,
                          "month": 11, "day_of_week": 5}).encode(),
              "event_time: the payload says 2013-11-30T10:00:00Z"),
    # Poison for the source's own timestamp parsing: each used to stall the job, or be held forever.
    Malformed(_flights_request, "attribute event_time='not-a-time' is neither RFC 3339",
              lambda now: {"event_time": "not-a-time"}),
    Malformed(_flights_request, "the message has no 'event_time' attribute", lambda now: {}),
    Malformed(lambda now: _flights_request("9999-12-31T23:59:59Z"), "more than --max_future_s 300",
              lambda now: {"event_time": "9999-12-31T23:59:59Z"}),
    Malformed(lambda now: _flights_request("1970-01-01T00:00:00Z"), "more than --allowed_lateness_s 3600",
              lambda now: {"event_time": "1970-01-01T00:00:00Z"}),
]


def _taxi_event(role: str, fields: dict, id_hash: str) -> Callable[[str], bytes]:
    """A chicago_taxi event whose payload's event_time is the publish time, so the bad value is the only fault;
    its id as the spec's pattern wants: the start minute (YYYYMMDDTHHMM), then 10 hex digits."""
    def data(now: str) -> bytes:
        event_id = f"{now[:16].replace('-', '').replace(':', '')}-{id_hash}"
        return json.dumps({"event_id": event_id, "role": role, "event_time": now, **fields}).encode()
    return data


TAXI_MALFORMED = [
    Malformed(_taxi_event("request", {"pickup_community_area": "8", "dropoff_community_area": "32",
                                      "trip_start_hour": 9, "trip_start_day": 3, "payment_type": "Cash",
                                      "company": "Taxi Affiliation Services", "centroid_distance_miles": 1.2,
                                      "fare": 0.0}, "000000000a"),
              "fare: 0.0 is below the minimum"),
    Malformed(_taxi_event("observation", {"pickup_community_area": "8", "fare": 7.25, "trip_miles": 1.1,
                                          "trip_seconds": 0}, "000000000b"),
              "trip_seconds: 0 is below the minimum 1"),
]


class Streamed(NamedTuple):
    """What one run of the flow saw, for the checks particular to a use case."""

    events: list[dict]  # as published (the recorded file)
    requests: set[str]
    predictions: dict[str, dict]  # event_id -> predictions row
    reference: dict[str, float]  # event_id -> the batch branch's example scored by the same SavedModel
    dead_letters: list[dict]  # parse-stage dead-letter rows
    published: dict  # publish.run's summary
    summary: dict  # streaming.run's summary


def _publish_malformed(topic: str, malformed: list[Malformed]) -> list[tuple[bytes, dict]]:
    """Publishes each message stamped with now (whole ms); returns the bytes and attributes sent."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    now = time_us_to_rfc3339(int(time.time() * 1000) * 1000)
    sent = []
    for message in malformed:
        data = message.data(now) if callable(message.data) else message.data
        attributes = message.attributes(now) if message.attributes else {"event_time": now}
        publisher.publish(topic, data, **attributes).result()
        sent.append((data, attributes))
    return sent


def _republish(topic: str, events: list[dict]) -> None:
    """Publishes events again, as the publisher did (a producer's retry, a redelivery)."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    for event in events:
        publisher.publish(topic, json.dumps(event, separators=(",", ":")).encode(), event_time=event["event_time"],
                          event_id=event["event_id"], role=event["role"],
                          message_key=f"{event['event_id']}/{event['role']}").result()


def _nothing_left_to_pull(subscription: str) -> bool:
    """True when the subscription holds no message that no one has pulled: a pull of our own finds none.
    Any it does find are handed straight back (ack deadline 0), for the job to pull as it would have."""
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    response = subscriber.pull(subscription=subscription, max_messages=1000, return_immediately=True, timeout=30)
    if not response.received_messages:
        return True
    subscriber.modify_ack_deadline(subscription=subscription, ack_deadline_seconds=0,
                                   ack_ids=[message.ack_id for message in response.received_messages])
    return False


def _conflicting_copy(events: list[dict]) -> dict:
    """A published observation with its first numeric field changed: same identity, other content."""
    observation = next(event for event in events if event["role"] == "observation")
    name = next(key for key, value in observation.items() if isinstance(value, (int, float)))
    return {**observation, name: observation[name] + 1}


def _rows(client, sql: str) -> list[dict]:
    return [dict(row.items()) for row in client.query(sql).result()]


def _print_latency(rows) -> None:
    """How long after its event time each prediction was written (shown with the test's output)."""
    seconds = sorted((row["processing_time"] - row["event_time"]).total_seconds() for row in rows)
    print(f"{len(seconds)} predictions written {seconds[0]:.1f} s (first) to {seconds[-1]:.1f} s (last) after their "
          f"event time, median {seconds[len(seconds) // 2]:.1f} s")


def _batch_reference(spec: str, recorded: Path, output: Path, version_dir: Path) -> dict[str, float]:
    """The batch branch on the file the publisher wrote, its examples scored by the same SavedModel."""
    return _batch_references(spec, recorded, output, [version_dir])[version_dir.name]


def _batch_references(spec: str, recorded: Path, output: Path, version_dirs: list[Path]) -> dict[str, dict]:
    """The batch branch on the file the publisher wrote, once, its examples scored by each version's
    SavedModel: {version: {event_id: prediction}}."""
    batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", spec, "--input", str(recorded),
               "--input_format", "json", "--output", str(output)])
    references = {}
    for version_dir in version_dirs:
        serve = tf.saved_model.load(str(version_dir / "saved_model")).signatures["serving_default"]
        reference = references[version_dir.name] = {}
        for split in SPLITS:
            for records in tf.data.TFRecordDataset(split_files(str(output), split),
                                                   compression_type="GZIP").batch(256):
                ids = tf.io.parse_example(records, {"event_id": tf.io.FixedLenFeature([], tf.string)})["event_id"]
                values = serve(examples=records)["prediction"].numpy()
                reference.update((i.decode(), float(v)) for i, v in zip(ids.numpy(), values))
    return references


def _batch_scoring(spec: str, recorded: Path, output: Path, version_dir: Path) -> dict[str, dict]:
    """beam_app.predict on the file the publisher wrote: event_id -> its predictions row."""
    summary = predict.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", spec,
                           "--input", str(recorded), "--input_format", "json", "--model", str(version_dir),
                           "--output", str(output)])
    assert all(summary["checks"].values()), summary["checks"]
    rows = [json.loads(line) for path in sorted((output / "predictions").glob("*.ndjson"))
            for line in path.read_text().splitlines()]
    assert all(row["source"] == "batch" for row in rows)
    return {row["event_id"]: row for row in rows}


def _stream_and_check(*, name: str, spec: str, version_dir: Path, publish_args: list[str], events: int,
                      malformed: list[Malformed], bigquery_emulator, tmp_path: Path,
                      job_flags: tuple[str, ...] = ()) -> Streamed:
    """Topic, subscription and tables of their own (`name`: the emulators are shared by the session);
    the streaming job in a thread; the malformed messages, then `events` events published with
    `publish_args` (recorded), then DUPLICATES of them again and one conflicting copy. Checks that every
    request gets exactly one prediction from this model, equal to the batch branch's on the recorded file
    where batch has one; that each malformed message is a parse dead letter with its reason, payload and
    attributes, and the conflict a duplicate dead letter naming both versions, all counted in the job's
    summary; and that every message is accounted for."""
    from google.cloud import pubsub_v1

    topic = f"projects/{PROJECT}/topics/{name}-events"
    subscription = f"projects/{PROJECT}/subscriptions/{name}-job"
    dataset = f"{name}_live"
    predictions_table, dead_letter_table = f"{PROJECT}:{dataset}.predictions", f"{PROJECT}:{dataset}.dead_letters"
    served_table, events_table = f"{PROJECT}:{dataset}.served_features", f"{PROJECT}:{dataset}.events"
    predictions_sql, dead_letters_sql = (f"`{PROJECT}.{dataset}.{table}`" for table in ("predictions", "dead_letters"))
    pubsub_v1.PublisherClient().create_topic(name=topic)
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    recorded = tmp_path / "published.ndjson"

    job = StreamingJob([
        "--runner", "DirectRunner", "--spec", spec, "--input_subscription", subscription,
        "--model", str(version_dir.parent), "--predictions_table", predictions_table,
        "--dead_letter_table", dead_letter_table, "--create_tables",
        "--served_features", served_table, "--events_table", events_table,
        "--bigquery_endpoint", bigquery_emulator.endpoint, *job_flags])
    job_failed = job.check
    try:
        client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
        wait_until(lambda: tables_exist(client, dataset), 60, "the job to create its tables", job_failed)
        # Poison first: the events after it must still be predicted.
        sent = _publish_malformed(topic, malformed)
        published = publish.run(["--topic", topic, "--spec", spec, *publish_args, "--limit", str(events),
                                 "--rebase_to_now", "--rate", "100", "--record", str(recorded)])
        assert published["published"] == events
        published_events = [json.loads(line) for line in recorded.read_text().splitlines()]
        requests = {event["event_id"] for event in published_events if event["role"] == "request"}
        observations = len(published_events) - len(requests)
        # At least once: the first events again (their predictions may be written already), and one conflict.
        copies = published_events[:DUPLICATES]
        conflict = _conflicting_copy(published_events)
        _republish(topic, copies + [conflict])
        messages = len(malformed) + events + len(copies) + 1

        def predicted() -> int:
            return _rows(client, f"SELECT COUNT(*) AS n FROM {predictions_sql}")[0]["n"]

        # Generous: on a busy machine the first bundle (the model loading, the first pull) can take long;
        # after that, a job that writes no prediction for 120 s is stuck.
        wait_until(lambda: predicted() >= len(requests), 180, f"{len(requests)} predictions", job_failed,
                   progress=predicted)
        dead = wait_until(lambda: (rows := _rows(client, f"SELECT * FROM {dead_letters_sql}")) and
                          len(rows) >= len(malformed) + 1 and rows, 60, "the dead letters", job_failed)
        # The job has pulled every message, the copies included, before it stops (its stop then lets what it
        # pulled reach the tables): a copy let through would be a second prediction, which the counts below see.
        wait_until(lambda: _nothing_left_to_pull(subscription), 60, "the job to pull every message, the copies too",
                   job_failed)
        job.stop_event.set()
        # The batch reference while the job stops.
        reference = _batch_reference(spec, recorded, tmp_path / "batch", version_dir)
        scored = _batch_scoring(spec, recorded, tmp_path / "predict", version_dir)
    finally:
        job.stop()
    summary = job.summary

    # Every request got exactly one prediction, and nothing else did: the copies changed nothing.
    counts = _rows(client, f"SELECT event_id, COUNT(*) AS n FROM {predictions_sql} GROUP BY event_id")
    assert {row["event_id"] for row in counts} == requests
    assert all(row["n"] == 1 for row in counts), [row for row in counts if row["n"] != 1][:5]
    streamed = {row["event_id"]: row for row in _rows(client, f"SELECT * FROM {predictions_sql}")}
    _print_latency(streamed.values())
    assert {row["model_version"] for row in streamed.values()} == {version_dir.name}

    # The consistency job over what was served, from the archive alone: every request found and recomputed.
    # The streaming DirectRunner's watermark is the wall clock: an observation pulled from Pub/Sub after the
    # request it precedes was answered is late, and the request's features lack it. That is the only
    # difference allowed, each one reproduced bit for bit by leaving out the observations that arrived after
    # the request's time (transforms/skew.py), and few.
    check = consistency.run(["--runner", "DirectRunner", "--spec", spec, "--served_features", served_table,
                             "--input", events_table, "--bigquery_endpoint", bigquery_emulator.endpoint,
                             "--output", str(tmp_path / "consistency")])
    late = {json.loads(line)["event_id"] for path in (tmp_path / "consistency").glob("differences-*")
            for line in path.read_text().splitlines()}
    assert check["requests_logged"] == check["requests_compared"] == len(requests)
    assert check["requests_equal"] + check["requests_different"] == len(requests)
    assert check["requests_different"] == len(late) <= len(requests) // 20, check
    assert check["differences_unexplained"] == 0 and set(check["explained_by"]) <= {"late_observation"}, check
    assert (check["rows_logged_not_recomputable"], check["requests_recomputable_not_logged"],
            check["history_records_refused"]) == (0, 0, 0)
    assert all(counts["compared"] == len(requests) for counts in check["features"].values())
    if late:
        print(f"{len(late)} of {len(requests)} requests answered before an observation in their window arrived "
              f"(explained as late_observation): {sorted(late)[:5]}")

    # Parity: the batch branch on the file the publisher wrote, scored by the same SavedModel.
    assert set(reference) <= requests
    mismatched = {event_id: (streamed[event_id]["prediction"], value) for event_id, value in reference.items()
                  if streamed[event_id]["prediction"] != pytest.approx(value, rel=1e-5, abs=1e-5)}
    assert set(mismatched) <= late, f"{len(mismatched)} of {len(reference)} predictions differ from batch: " \
                                    f"{[(k, v) for k, v in mismatched.items() if k not in late][:5]}"
    # Parity with batch scoring (beam_app.predict) on the same file: every request, labeled or not, scored once
    # by the same version, the same prediction (but where the stream saw an observation late).
    assert set(scored) == requests
    assert {row["model_version"] for row in scored.values()} == {version_dir.name}
    differ = {event_id for event_id, row in scored.items()
              if streamed[event_id]["prediction"] != pytest.approx(row["prediction"], rel=1e-5, abs=1e-5)}
    assert differ <= late, f"{len(differ)} of {len(scored)} batch predictions differ from streaming: " \
                           f"{sorted(differ - late)[:5]}"
    print(f"batch scoring vs streaming: {len(scored) - len(differ)} of {len(scored)} predictions equal, "
          f"{len(differ)} differ, each explained by a late observation")

    # The conflicting copy: a dead letter naming both versions.
    (conflict_letter,) = [row for row in dead if row["stage"] == "duplicate"]
    assert conflict_letter["source"] == f"event:{conflict['event_id']}/{conflict['role']}"
    assert json.loads(conflict_letter["payload"]) == conflict
    assert "(kept) vs" in conflict_letter["error"] and "(this copy)" in conflict_letter["error"]

    # Every message accounted for: predictions + observations + dead letters + duplicates = messages.
    assert len(streamed) + observations + len(dead) + len(copies) == messages
    # Malformed messages: dead letters with the reason, payload and attributes; counted in the summary.
    parse_letters = sorted((row for row in dead if row["stage"] == "parse"), key=lambda row: row["error"])
    assert len(parse_letters) == len(malformed)
    for (data, attributes), message in zip(sent, malformed):
        (letter,) = [row for row in parse_letters if message.reason in row["error"]]
        assert letter["payload"] == data.decode("utf-8", errors="replace")
        assert json.loads(letter["attributes"]) == attributes
    assert summary["predictions"] == len(requests)
    assert summary["dead_letters"] == {"parse": len(malformed), "duplicate": 1}
    # The evidence: every request's features logged, every accepted event archived once.
    assert summary["served_features"] == len(requests)
    roles = [event["role"] for event in published_events]
    assert summary["events"] == {role: roles.count(role) for role in set(roles)}
    # The job's own count of what it read and answered: every message, the first copy of each event, no gap.
    assert summary["read"] == {"messages": messages, "accepted": {role: roles.count(role) for role in set(roles)},
                               "identical_copies": len(copies)}
    assert summary["requests_unanswered"] == 0
    # Feature state: one live key per (group, key value) the events hold; the stream is shorter than the
    # horizon, so none has ended.
    live = sum(len({tuple(event[field] for field in group.key) for event in published_events
                    if event["role"] in (REQUEST, group.kind) and all(event.get(field) is not None
                                                                      for field in group.key)})
               for group in feature_groups(load_spec(spec)))
    assert summary["feature_state"]["live_keys"] == live and summary["feature_state"]["cleared"] == 0

    return Streamed(published_events, requests, streamed, reference, parse_letters, published, summary)


@pytest.mark.slow
def test_published_events_get_exactly_one_prediction_each_equal_to_batch(
        pubsub_emulator, bigquery_emulator, bigtable_emulator, trained_model, tmp_path):
    _, version_dir = trained_model
    source = tmp_path / "slice.csv"
    source.write_text("\n".join(flights_lines(lambda month, day: (month, day) == (11, 30))) + "\n")
    online_table = "projects/test-project/instances/local/tables/hostile-stream"
    run = _stream_and_check(name="flights", spec="flights", version_dir=version_dir,
                            publish_args=["--input", str(source)], events=EVENTS, malformed=MALFORMED,
                            bigquery_emulator=bigquery_emulator, tmp_path=tmp_path,
                            job_flags=("--online_table", online_table))
    assert len(run.reference) > 100  # labeled requests (cancelled flights have none)
    # The online store the same hostile stream kept: each accepted observation once under its origin (the
    # copies and the conflict rewrote nothing new), and nothing of the poison.
    from google.cloud.bigtable.data import ReadRowsQuery, RowRange

    from beam_app.online.bigtable_store import _data_client

    observations = {event["event_id"] for event in run.events if event["role"] == "observation"}
    with _data_client("test-project") as client:
        rows = client.get_table("local", "hostile-stream").read_rows(
            ReadRowsQuery(row_ranges=[RowRange(b"origin#", b"origin$")]))
    stored = [cell.qualifier.decode() for row in rows for cell in row.cells]
    assert sorted(stored) == sorted(observations)


@pytest.mark.slow
def test_two_kinds_of_observation_on_one_topic(pubsub_emulator, bigquery_emulator, flights_weather_batch,
                                                flights_weather_model, tmp_path):
    """The flights_weather spec: departures and the hourly weather, two CSV
    sources the publisher merges in event-time order onto one topic (each
    message's role names its kind); the job's features from both kinds equal
    batch's, the archive holds both, and the consistency job recomputes every
    served feature, the weather's included."""
    _, version_dir = flights_weather_model
    flights, weather = tmp_path / "flights.csv", tmp_path / "weather.csv"
    flights.write_text("\n".join(flights_lines(lambda month, day: (month, day) == (11, 30))) + "\n")
    weather.write_text("\n".join(weather_lines(lambda month, day: (month, day) in {(11, 29), (11, 30)})) + "\n")
    run = _stream_and_check(name="weather", spec="flights_weather", version_dir=version_dir,
                            publish_args=["--input", f"flights={flights}", "--input", f"weather={weather}"],
                            events=EVENTS, malformed=MALFORMED[:2], bigquery_emulator=bigquery_emulator,
                            tmp_path=tmp_path)
    roles = {event["role"] for event in run.events}
    assert roles == {"request", "observation", "weather"}
    times = [rfc3339_to_time_us(event["event_time"]) for event in run.events]
    assert times == sorted(times)  # merged in event-time order
    assert len(run.reference) > 100


@pytest.mark.slow
def test_taxi_events_stream_through_the_same_job(pubsub_emulator, bigquery_emulator, taxi_batch, taxi_model,
                                                tmp_path):
    """The chicago_taxi spec through the publisher (its embedded data, read by its CSV adapter) and the
    streaming job, neither changed: the same guarantees as flights, and the taxi spec's own range
    checks (a zero fare, a zero duration) as dead letters."""
    _, version_dir = taxi_model
    run = _stream_and_check(name="taxi", spec="chicago_taxi", version_dir=version_dir, publish_args=[],
                            events=TAXI_EVENTS, malformed=TAXI_MALFORMED, bigquery_emulator=bigquery_emulator,
                            tmp_path=tmp_path)
    spec = load_spec("chicago_taxi")
    assert run.published["spec"] == run.summary["spec"]["name"] == "chicago_taxi"
    # The embedded data, through the spec's CSV adapter: the publisher drops the rows batch does.
    assert [Path(path).name for path in run.published["input"]] == ["chicago_taxi.csv"]
    assert run.published["dead_letters"] == taxi_batch["summary"]["dead_letters"] > 0
    # A trip's request comes before its observation, so at least half the events are requests; each
    # carries its fare: batch labels (so scores) every one.
    assert len(run.requests) >= TAXI_EVENTS // 2
    assert set(run.reference) == run.requests
    assert {row["spec_fingerprint"] for row in run.predictions.values()} == {spec.fingerprint}
    assert all(math.isfinite(row["prediction"]) for row in run.predictions.values())
    # The bad values are the only fault: stamped at the time their payload says.
    for letter in run.dead_letters:
        assert json.loads(letter["attributes"])["event_time"] == json.loads(letter["payload"])["event_time"]
