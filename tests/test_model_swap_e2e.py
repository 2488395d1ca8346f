"""A running streaming job takes up a new model version without a restart, and
refuses one of another spec, on the real emulators.

Timeline: v1 serves; LATEST is pointed at a model trained on the chicago_taxi
spec (refused: a dead letter, v1 keeps serving); a second flights version is
trained into the same model directory while the job runs (accepted). Every
request is predicted once, by the version its row names, and each prediction
equals that version's prediction of the batch branch's example."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.conftest import SMALL_TRAINING
from tests.emulators import StreamingJob, tables_exist, wait_until
from tests.flights_slice import flights_lines, slice_events
from transforms.events import event_to_json, rfc3339_to_time_us
from transforms.spec import load_spec

tf = pytest.importorskip("tensorflow")

from beam_app import publish  # noqa: E402
from beam_app.bigquery.client import bigquery_client  # noqa: E402
from tests.test_streaming_e2e import _batch_references, _rows  # noqa: E402

PROJECT = "test-project"
CHUNK = 40  # events per publish


@pytest.mark.slow
def test_a_new_version_takes_over_without_restart_and_one_of_another_spec_is_refused(
        pubsub_emulator, bigquery_emulator, trained_model, taxi_model, tmp_path):
    from google.cloud import pubsub_v1

    from models import train

    params, v1_dir = trained_model
    _, taxi_dir = taxi_model
    model_dir = tmp_path / "model"  # a copy: the session's model directory must keep its LATEST
    model_dir.mkdir()
    shutil.copytree(v1_dir, model_dir / v1_dir.name)
    (model_dir / "LATEST").write_text(v1_dir.name + "\n")
    # The replay in chunks of consecutive events (engine order), each published when the test says.
    start = rfc3339_to_time_us("2013-11-30T11:00:00Z")
    events = sorted((e for e in slice_events(load_spec("flights"), flights_lines(
        lambda month, day: (month, day) == (11, 30))) if e.time_us >= start),
        key=lambda e: (e.time_us, e.role != "request", e.event_id))
    chunks = [events[i:i + CHUNK] for i in range(0, len(events), CHUNK)]

    topic, subscription = f"projects/{PROJECT}/topics/swap-events", f"projects/{PROJECT}/subscriptions/swap-job"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    predictions_sql, dead_letters_sql = "`test-project.swap.predictions`", "`test-project.swap.dead_letters`"
    recorded = []

    def publish_chunk() -> set[str]:
        source = tmp_path / f"chunk{len(recorded)}.ndjson"
        source.write_text("".join(event_to_json(e) + "\n" for e in chunks[len(recorded)]))
        path = tmp_path / f"part{len(recorded)}.ndjson"
        summary = publish.run(["--topic", topic, "--input", str(source), "--input_format", "json",
                               "--rebase_to_now", "--rate", "100", "--record", str(path)])
        assert summary["published"] == CHUNK
        recorded.append(path)
        return {e["event_id"] for e in map(json.loads, path.read_text().splitlines()) if e["role"] == "request"}

    def versions_of(requests: set[str]) -> dict[str, str]:
        rows = _rows(client, f"SELECT event_id, model_version FROM {predictions_sql}")
        return {row["event_id"]: row["model_version"] for row in rows if row["event_id"] in requests}

    job = StreamingJob(["--runner", "DirectRunner", "--input_subscription", subscription, "--model", str(model_dir),
                "--model_poll_s", "1", "--predictions_table", f"{PROJECT}:swap.predictions",
                "--dead_letter_table", f"{PROJECT}:swap.dead_letters", "--create_tables",
                "--bigquery_endpoint", bigquery_emulator.endpoint])
    requests: set[str] = set()
    try:
        wait_until(lambda: tables_exist(client, "swap"), 60, "the job's tables", job.check)
        first = publish_chunk()
        requests |= first
        wait_until(lambda: len(versions_of(first)) == len(first), 180, "v1's predictions", job.check,
                   progress=lambda: len(versions_of(first)))

        # A model of another spec: refused, v1 keeps serving.
        shutil.copytree(taxi_dir, model_dir / "taxi-version")
        (model_dir / "LATEST").write_text("taxi-version\n")
        second = publish_chunk()
        requests |= second
        wait_until(lambda: len(versions_of(second)) == len(second), 120, "predictions after the refusal", job.check,
                   progress=lambda: len(versions_of(second)))
        refused = wait_until(lambda: _rows(client, f"SELECT * FROM {dead_letters_sql} WHERE stage = 'model'"), 60,
                             "the refused model's dead letter", job.check)

        # A second flights version, trained while the job runs: it takes over.
        v2_dir = train.run(train.Params(data_dir=params.data_dir, model_dir=str(model_dir),
                                        **{**SMALL_TRAINING, "epochs": 1}, seed=7))
        switched_at = time.time()
        while not any(v == v2_dir.name for v in versions_of(requests).values()):
            chunk = publish_chunk()
            requests |= chunk
            wait_until(lambda: len(versions_of(chunk)) == len(chunk), 120, "predictions after v2", job.check,
                       progress=lambda: len(versions_of(chunk)))
            assert time.time() - switched_at < 120, "v2 never served"
    finally:
        job.stop()

    rows = _rows(client, f"SELECT event_id, model_version, prediction, processing_time FROM {predictions_sql}")
    assert sorted(row["event_id"] for row in rows) == sorted(requests)  # none lost, none twice
    by_version = {}
    for row in rows:
        by_version.setdefault(row["model_version"], []).append(row)
    assert set(by_version) == {v1_dir.name, v2_dir.name}
    assert all(versions_of(first | second)[i] == v1_dir.name for i in first | second)
    first_v2 = min(row["processing_time"] for row in by_version[v2_dir.name])
    print(f"model swap: v1 {len(by_version[v1_dir.name])} predictions, v2 {len(by_version[v2_dir.name])}; "
          f"v2 served {first_v2.timestamp() - switched_at:.1f} s after LATEST named it")

    (letter,) = refused
    assert letter["source"] == f"model:{model_dir / 'taxi-version'}"
    assert "model version taxi-version refused, the serving model keeps serving" in letter["error"]
    assert "spec" in letter["error"]

    # Each prediction is its own version's prediction of the batch example.
    history = tmp_path / "history.ndjson"
    history.write_text("".join(path.read_text() for path in recorded))
    references = _batch_references("flights", history, tmp_path / "batch", [v1_dir, v2_dir])
    for version_dir in (v1_dir, v2_dir):
        reference = references[version_dir.name]
        served = {row["event_id"]: row["prediction"] for row in by_version[version_dir.name]}
        checked = set(served) & set(reference)
        assert checked
        differ = {i: (served[i], reference[i]) for i in checked
                  if served[i] != pytest.approx(reference[i], rel=1e-5, abs=1e-5)}
        assert not differ, f"{version_dir.name}: {list(differ.items())[:3]}"
