"""Online scoring end to end on the real emulators (Pub/Sub, BigQuery, Bigtable):
the streaming job fills the online store from a replay, the service (under
uvicorn, over HTTP) answers every request of the replay, and each answer
equals batch scoring of the same request over the same history: the
features bit for bit (the consistency job, from the served-features log),
the predictions within 1e-5 (beam_app.predict on the file the publisher
wrote). A request later than the store's progress is answered with its lag."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from tests.emulators import StreamingJob, tables_exist, wait_until
from tests.test_streaming_e2e import _batch_scoring, _rows

tf = pytest.importorskip("tensorflow")

from beam_app import consistency, publish, serve  # noqa: E402
from beam_app.bigquery.client import bigquery_client  # noqa: E402
from beam_app.local.stack import free_port  # noqa: E402
from beam_app.online.bigtable_store import OnlineStore  # noqa: E402
from beam_app.online.layout import parse_table_path  # noqa: E402
from transforms.events import rfc3339_to_time_us, time_us_to_rfc3339  # noqa: E402
from transforms.spec import REQUEST  # noqa: E402

PROJECT = "test-project"
EVENTS = 300


class Server:
    """beam_app.serve's app under uvicorn in a thread of the test process, on a free port."""

    def __init__(self, argv: list[str]):
        import uvicorn

        self.port = free_port()
        self.service = serve.Service(serve.parser().parse_args([*argv, "--port", str(self.port)]))
        self._server = uvicorn.Server(uvicorn.Config(self.service.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, 30, "uvicorn to listen")
        self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        self._connection.request(method, path, body=json.dumps(body) if body is not None else None,
                                 headers={"Content-Type": "application/json"})
        response = self._connection.getresponse()
        return response.status, json.loads(response.read())

    def stop(self) -> str:
        self._server.should_exit = True
        self._thread.join(30)
        self.service.close()
        return self.service.summary()


@pytest.mark.slow
def test_online_answers_equal_batch_scoring_of_the_same_history(pubsub_emulator, bigquery_emulator,
                                                                 bigtable_emulator, trained_model, tmp_path):
    from google.cloud import pubsub_v1

    version_dir = trained_model[1]
    topic, subscription = f"projects/{PROJECT}/topics/online-events", f"projects/{PROJECT}/subscriptions/online-job"
    dataset = "online_live"
    served_table, events_table = f"{PROJECT}:{dataset}.served_features", f"{PROJECT}:{dataset}.events"
    online_table = f"projects/{PROJECT}/instances/local/tables/flights"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    recorded = tmp_path / "published.ndjson"
    job = StreamingJob([
        "--runner", "DirectRunner", "--input_subscription", subscription, "--model", str(version_dir.parent),
        "--predictions_table", f"{PROJECT}:{dataset}.predictions", "--dead_letter_table",
        f"{PROJECT}:{dataset}.dead_letters", "--served_features", served_table, "--events_table", events_table,
        "--online_table", online_table, "--create_tables", "--bigquery_endpoint", bigquery_emulator.endpoint])
    server = None
    try:
        client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
        wait_until(lambda: tables_exist(client, dataset), 60, "the job to create its tables", job.check)
        published = publish.run(["--topic", topic, "--limit", str(EVENTS), "--rebase_to_now", "--rate", "100",
                                 "--record", str(recorded)])
        assert published["published"] == EVENTS
        events = [json.loads(line) for line in recorded.read_text().splitlines()]
        requests = [event for event in events if event["role"] == REQUEST]
        last_us = max(rfc3339_to_time_us(event["event_time"]) for event in events)

        # Asked while the stream is still reading the replay: an answer is complete (right), or says its lag.
        server = Server(["--model", str(version_dir.parent), "--online_table", online_table,
                         "--bigquery_endpoint", bigquery_emulator.endpoint])
        early = {}
        for request in requests:
            status, body = server.call("POST", "/v1/predict", {"instances": [request]})
            assert status == 200, body
            early[request["event_id"]] = body["predictions"][0]
        server.stop()
        server = None
        # The stream has taken every event: each archived, each request predicted.
        def archived() -> int:
            return _rows(client, f"SELECT COUNT(*) AS n FROM `{PROJECT}.{dataset}.events`")[0]["n"]
        wait_until(lambda: archived() == EVENTS, 180, f"the {EVENTS} events archived", job.check, progress=archived)
        wait_until(lambda: _rows(client, f"SELECT COUNT(*) AS n FROM `{PROJECT}.{dataset}.predictions`")[0]["n"]
                   == len(requests), 60, "a prediction per request", job.check)
        # The store is complete for every request once its progress reaches the last event published.
        store = OnlineStore(parse_table_path(online_table))
        wait_until(lambda: (store.through_us() or 0) >= last_us, 60, "the store's progress to reach the replay's end",
                   job.check, progress=store.through_us)
        # Observations written: every one of the replay, under each of its groups' rows.
        server = Server(["--model", str(version_dir.parent), "--online_table", online_table,
                         "--served_features", served_table, "--bigquery_endpoint", bigquery_emulator.endpoint])
        answers = {}
        for request in requests:
            status, body = server.call("POST", "/v1/predict", {"instances": [request]})
            assert status == 200, body
            (answer,) = body["predictions"]
            assert answer["event_id"] == request["event_id"] and answer["event_time"] == request["event_time"]
            assert answer["store"]["complete"] is True and answer["store"]["lag_s"] == 0
            answers[request["event_id"]] = answer
        # Batched: the same answers.
        status, body = server.call("POST", "/v1/predict", {"instances": requests[:20]})
        assert status == 200 and [a["features"] for a in body["predictions"]] == \
            [answers[r["event_id"]]["features"] for r in requests[:20]]

        # A request ahead of the store's progress: answered, with its lag, not silently.
        ahead_us = int(time.time() * 1e6) + 200 * 10 ** 6
        status, body = server.call("POST", "/v1/predict", {"instances": [
            dict(requests[-1], event_id=requests[-1]["event_id"][:-3] + "JFK", origin="JFK",
                 event_time=time_us_to_rfc3339(ahead_us))]})
        assert status == 200 and body["predictions"][0]["store"]["complete"] is False
        assert body["predictions"][0]["store"]["lag_s"] >= 100
        status, health = server.call("GET", "/healthz")
        assert status == 200 and health["model_version"] == version_dir.name
        summary = server.stop()
        server = None
        print(summary)
        wait_until(lambda: len(_rows(client, f"SELECT event_id FROM `{PROJECT}.{dataset}.served_features` "
                                             "WHERE source = 'online'")) == len(requests) + 21,
                   30, "the online rows in the served-features log")
        job.stop_event.set()
        scored = _batch_scoring("flights", recorded, tmp_path / "predict", version_dir)
    finally:
        if server is not None:
            server.stop()
        job.stop()

    # Features: the consistency job recomputes every served row (online and streamed) from the events archive.
    check = consistency.run(["--runner", "DirectRunner", "--served_features", served_table, "--input", events_table,
                             "--bigquery_endpoint", bigquery_emulator.endpoint, "--output",
                             str(tmp_path / "consistency")])
    differences = [json.loads(line) for path in (tmp_path / "consistency").glob("differences-*")
                   for line in path.read_text().splitlines()]
    online_differences = [d for d in differences if d["source"] == "online"]
    assert online_differences == [], online_differences[:3]
    assert check["differences_unexplained"] == 0, check
    assert check["requests_logged"] == len(requests) + 1 and check["requests_compared"] == len(requests)
    assert check["rows_logged_not_recomputable"] == 1  # the request ahead of the store is in no history
    # Predictions: batch scoring of the same requests over the same history, within 1e-5.
    assert set(scored) == set(answers)
    differ = {event_id: (answer["prediction"], scored[event_id]["prediction"]) for event_id, answer in answers.items()
              if answer["prediction"] != pytest.approx(scored[event_id]["prediction"], rel=1e-5, abs=1e-5)}
    assert not differ, f"{len(differ)} of {len(answers)} online predictions differ from batch scoring: " \
                       f"{list(differ.items())[:5]}"
    assert {answer["model_version"] for answer in answers.values()} == {version_dir.name}

    print(f"online vs batch: {len(answers)} of {len(answers)} requests, features equal bit for bit "
          f"(consistency job), predictions within 1e-5 (beam_app.predict)")

    # The answers given while the stream was behind: those it said were complete are the final ones.
    complete = [event_id for event_id, answer in early.items() if answer["store"]["complete"]]
    wrong = [event_id for event_id in complete if early[event_id]["features"] != answers[event_id]["features"]]
    assert not wrong, f"{len(wrong)} answers said complete while the stream was behind were not: {wrong[:5]}"
    behind = [answer["store"]["lag_s"] for answer in early.values() if not answer["store"]["complete"]]
    assert all(lag is None or lag > 0 for lag in behind)
    print(f"asked while the stream read the replay: {len(complete)} answers complete (each equal to the final "
          f"one), {len(behind)} with their lag (up to {max((lag or 0) for lag in behind or [0]):.1f} s)")
