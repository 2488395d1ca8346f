"""A streaming job (re)started in the middle of a replay, on the real emulators,
with and without a warm start (--bootstrap_input).

The first part of the replay was served before the restart; its record is the
history the restarted job may load. Two jobs start after it, on subscriptions
of their own to the same topic, so both see exactly the second part: one cold,
one warm. The reference is the batch branch over the whole history (both
parts), scored by the same SavedModel: a request is at parity when its
streamed prediction equals it (to the inference tests' 1e-5; the features
themselves are compared bit for bit by the TestStream tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.emulators import StreamingJob, tables_exist, wait_until
from tests.flights_slice import flights_lines

tf = pytest.importorskip("tensorflow")

from beam_app import consistency, publish  # noqa: E402
from beam_app.bigquery.client import bigquery_client  # noqa: E402
from tests.test_streaming_e2e import _batch_reference, _rows  # noqa: E402

PROJECT = "test-project"
PART = 160  # events per part: about 80 requests


def _subscribe(topic: str, name: str) -> str:
    from google.cloud import pubsub_v1

    subscription = f"projects/{PROJECT}/subscriptions/{name}"
    pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
    return subscription


@pytest.mark.slow
def test_a_restarted_job_with_bootstrap_answers_its_first_requests_as_batch_does(
        pubsub_emulator, bigquery_emulator, trained_model, tmp_path):
    from google.cloud import pubsub_v1

    from tests.flights_slice import slice_events
    from transforms.events import rfc3339_to_time_us, time_us_to_rfc3339
    from transforms.spec import load_spec

    _, version_dir = trained_model
    lines = flights_lines(lambda month, day: (month, day) == (11, 30))
    source = tmp_path / "slice.csv"
    source.write_text("\n".join(lines) + "\n")
    # The second part starts after the last event of the first: the parts must not overlap.
    first = rfc3339_to_time_us("2013-11-30T12:00:00Z")
    times = sorted(e.time_us for e in slice_events(load_spec("flights"), lines) if e.time_us >= first)
    second_start = time_us_to_rfc3339((times[PART - 1] // 1_000_000 + 1) * 1_000_000)[:-1]
    topic = f"projects/{PROJECT}/topics/restart-events"
    pubsub_v1.PublisherClient().create_topic(name=topic)

    def replay(start_time: str, record: Path) -> list[dict]:
        summary = publish.run(["--topic", topic, "--input", str(source), "--start", start_time,
                               "--limit", str(PART), "--rebase_to_now", "--rate", "100", "--record", str(record)])
        assert summary["published"] == PART
        return [json.loads(line) for line in record.read_text().splitlines()]

    # Served before the restart (by a job whose history this record is).
    before = replay("2013-11-30T12:00:00", tmp_path / "before.ndjson")
    assert len(before) == PART

    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    jobs = {}
    for name, extra in (("cold", []), ("warm", ["--bootstrap_input", str(tmp_path / "before.ndjson")])):
        jobs[name] = StreamingJob([
            "--runner", "DirectRunner", "--input_subscription", _subscribe(topic, f"restart-{name}"),
            "--model", str(version_dir.parent), "--predictions_table", f"{PROJECT}:restart_{name}.predictions",
            "--dead_letter_table", f"{PROJECT}:restart_{name}.dead_letters", "--create_tables",
            "--served_features", f"{PROJECT}:restart_{name}.served_features",
            "--bigquery_endpoint", bigquery_emulator.endpoint, *extra])
    try:
        for name, job in jobs.items():
            wait_until(lambda: tables_exist(client, f"restart_{name}"), 60, f"the {name} job's tables", job.check)
        after = replay(second_start, tmp_path / "after.ndjson")
        assert not {(e["event_id"], e["role"]) for e in after} & {(e["event_id"], e["role"]) for e in before}
        requests = {event["event_id"] for event in after if event["role"] == "request"}
        for name, job in jobs.items():
            written = lambda: len(_rows(client, f"SELECT event_id FROM `{PROJECT}.restart_{name}.predictions`"))  # noqa
            wait_until(lambda: written() >= len(requests), 180, f"the {name} job's predictions", job.check,
                       progress=written)
    finally:
        for job in jobs.values():
            job.stop()

    history = tmp_path / "history.ndjson"
    history.write_text((tmp_path / "before.ndjson").read_text() + (tmp_path / "after.ndjson").read_text())
    reference = _batch_reference("flights", history, tmp_path / "batch", version_dir)
    labeled = requests & set(reference)
    assert len(labeled) > 50

    shares, served_by = {}, {}
    for name in jobs:
        rows = _rows(client, f"SELECT event_id, prediction FROM `{PROJECT}.restart_{name}.predictions`")
        served = served_by[name] = {row["event_id"]: row["prediction"] for row in rows}
        assert len(served) == len(rows) and set(served) == requests  # one prediction per request, no more
        equal = [i for i in labeled if served[i] == pytest.approx(reference[i], rel=1e-5, abs=1e-5)]
        shares[name] = len(equal) / len(labeled)
    print(f"requests in the first max(window) after a restart at parity with batch over the whole history: "
          f"with bootstrap {shares['warm']:.1%}, without {shares['cold']:.1%} ({len(labeled)} requests)")
    assert shares["warm"] == 1.0
    assert shares["cold"] < 0.5  # the test can tell: cold windows miss the history before the restart

    # The consistency job on each job's served features against the whole history: the warm job has no
    # difference; every difference of the cold one is found, and explained by its missing warm start.
    checks = {}
    for name in jobs:
        output = tmp_path / f"consistency_{name}"
        checks[name] = consistency.run([
            "--runner", "DirectRunner", "--served_features", f"{PROJECT}:restart_{name}.served_features",
            "--input", str(history), "--bigquery_endpoint", bigquery_emulator.endpoint, "--output", str(output)])
        assert checks[name]["requests_compared"] == len(requests)
    assert checks["warm"]["differences"] == 0 and checks["warm"]["passed"]
    cold = checks["cold"]
    differing = {json.loads(line)["event_id"] for path in (tmp_path / "consistency_cold").glob("differences-*")
                 for line in path.read_text().splitlines()}
    mispredicted = {i for i in labeled if served_by["cold"][i] != pytest.approx(reference[i], rel=1e-5, abs=1e-5)}
    assert mispredicted <= differing and cold["requests_different"] == len(differing) > 0
    assert cold["differences_unexplained"] == 0 and cold["explained_by"] == {"no_bootstrap": len(differing)}
    assert not cold["passed"]
