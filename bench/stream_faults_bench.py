"""The streaming job against a hostile stream, on both emulators: what
duplicates, poison messages and stops do, in figures for the README.

1. One job (beam_app.local.demo's stack: Pub/Sub and BigQuery emulators, the
   job as a subprocess) gets a replay of flights, every event of its first
   part published twice and one conflicting copy, plus one message of each
   poison kind, published first. Printed: double rows, double counts (the
   features are checked bit for bit in the tests), each poison kind's dead
   letter, whether the events after the poison were predicted, and whether
   predictions + observations + dead letters + duplicates = messages.
2. Stops: the job is started again --stops times and stopped with SIGINT
   and SIGTERM in turn once it has written its predictions; printed: the
   time from the signal to the exit, the exit code and whether the summary
   was printed (median and max).

    python bench/stream_faults_bench.py [--model output/model] [--events 200] [--stops 10]

Needs a trained model (`make run`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beam_app.local.demo import wait_for_predictions  # noqa: E402
from beam_app.local.streaming_stack import DEAD_LETTERS, PREDICTIONS, TOPIC, query, streaming_stack  # noqa: E402

POISON = {  # kind -> (attributes given now, payload given now)
    "event_time attribute not a time": (lambda now: {"event_time": "not-a-time"}, None),
    "no event_time attribute": (lambda now: {}, None),
    "attribute disagrees with payload": (lambda now: {"event_time": "2013-01-01T00:00:00Z"}, None),
    "year 9999": (lambda now: {"event_time": "9999-12-31T23:59:59Z"}, "9999-12-31T23:59:59Z"),
    "request from 1970": (lambda now: {"event_time": "1970-01-01T00:00:00Z"}, "1970-01-01T00:00:00Z"),
    "not JSON": (lambda now: {"event_time": now}, b"{not json"),
}


def _request(event_time: str) -> bytes:
    return json.dumps({"event_id": "20131202-UA9-EWR", "role": "request", "event_time": event_time, "carrier": "UA",
                       "origin": "EWR", "dest": "ORD", "distance": 719.0, "hour": 6, "minute": 0, "month": 12,
                       "day_of_week": 0}).encode()


def faults(model: str, events: int, work: Path) -> None:
    from google.cloud import pubsub_v1

    from beam_app import publish

    with streaming_stack(model, work / "faults_job.log") as stack:
        publisher = pubsub_v1.PublisherClient()
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for attributes, payload in POISON.values():
            data = payload if isinstance(payload, bytes) else _request(payload or now)
            publisher.publish(TOPIC, data, **attributes(now)).result()
        record = work / "published.ndjson"
        with contextlib.redirect_stdout(io.StringIO()):  # the publisher's own summary
            publish.run(["--topic", TOPIC, "--start", "2013-12-02T11:00:00Z", "--limit", str(events),
                         "--rate", "50", "--rebase_to_now", "--record", str(record)])
        sent = [json.loads(line) for line in record.read_text().splitlines()]
        twice = sent[: events // 2]
        for event in twice:
            publisher.publish(TOPIC, json.dumps(event).encode(), event_time=event["event_time"]).result()
        observation = next(e for e in sent if e["role"] == "observation")
        publisher.publish(TOPIC, json.dumps({**observation, "dep_delay": observation["dep_delay"] + 1}).encode(),
                          event_time=observation["event_time"]).result()
        requests = {e["event_id"] for e in sent if e["role"] == "request"}
        wait_for_predictions(stack.bigquery, stack.job, len(requests), timeout_s=max(120, 2 * len(requests)),
                             progress=False)
        time.sleep(5)  # a second row would be written now
        rows = query(stack.bigquery, f"SELECT event_id FROM `{PREDICTIONS.replace(':', '.')}`")
        dead = query(stack.bigquery, f"SELECT stage, error FROM `{DEAD_LETTERS.replace(':', '.')}`")
    messages = len(POISON) + len(sent) + len(twice) + 1
    observations = len(sent) - len(requests)
    reasons = [row["error"] for row in dead if row["stage"] == "parse"]
    print(f"duplicates: {len(twice)} events sent twice ({sum(e['role'] == 'request' for e in twice)} requests), "
          f"1 conflicting copy")
    print(f"  prediction rows {len(rows)} for {len(requests)} requests: double rows "
          f"{len(rows) - len({r['event_id'] for r in rows})}; conflict dead letters "
          f"{sum(row['stage'] == 'duplicate' for row in dead)}")
    print(f"poison: {len(POISON)} kinds, {len(reasons)} dead letters with a reason "
          f"({len(reasons) / len(POISON):.0%}); events published after them predicted: "
          f"{'all' if {r['event_id'] for r in rows} >= requests else 'NOT ALL'}")
    for reason in reasons:
        print(f"  {reason[:110]}")
    total = len(rows) + observations + len(dead) + len(twice)
    print(f"accounting: predictions {len(rows)} + observations {observations} + dead letters {len(dead)} + "
          f"duplicates {len(twice)} = {total} of {messages} messages: {'adds up' if total == messages else 'OFF'}")


def stops(model: str, count: int, work: Path) -> None:
    from beam_app import publish

    seconds, clean = [], 0
    for index in range(count):
        signum = (signal.SIGINT, signal.SIGTERM)[index % 2]
        log = work / f"stop_{index}.log"
        with streaming_stack(model, log) as stack:
            with contextlib.redirect_stdout(io.StringIO()):
                publish.run(["--topic", TOPIC, "--start", "2013-12-02T11:00:00Z", "--limit", "20",
                             "--rate", "0", "--rebase_to_now", "--record", str(work / "stop.ndjson")])
            requests = sum('"role":"request"' in line for line in (work / "stop.ndjson").read_text().splitlines())
            wait_for_predictions(stack.bigquery, stack.job, requests, timeout_s=120, progress=False)
            started = time.monotonic()
            stack.job.send_signal(signum)
            try:
                stack.job.wait(60)
            except subprocess.TimeoutExpired:
                stack.job.kill()
            seconds.append(time.monotonic() - started)
        ok = stack.job.returncode == 0 and "streaming job stopped" in log.read_text()
        clean += ok
        print(f"  stop {index + 1}: {signal.Signals(signum).name} -> exit {stack.job.returncode} in "
              f"{seconds[-1]:.1f} s{'' if ok else ' (no summary)'}", flush=True)
    print(f"stop: {count} stops, median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s; "
          f"{clean} of {count} exited 0 with their summary")


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "output" / "model"))
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--stops", type=int, default=10)
    args = parser.parse_args()
    if not (Path(args.model) / "LATEST").exists():
        sys.exit(f"error: no model at {args.model}: run `make run` first")
    with tempfile.TemporaryDirectory() as work:
        faults(args.model, args.events, Path(work))
        stops(args.model, args.stops, Path(work))


if __name__ == "__main__":
    main()
