"""The streaming demo on one machine, in one command (`make demo` runs it):

1. starts the Pub/Sub and BigQuery emulators (beam_app.local.stack);
2. creates the topic, the job's subscription and both BigQuery tables;
3. starts the streaming job, `python -m beam_app.streaming`, on the
   DirectRunner with the model `make run` trained;
4. publishes flights events with `python -m beam_app.publish --rebase_to_now`
   (the DirectRunner's watermark is the wall clock), and a few malformed
   messages;
5. waits until every request has its prediction, then prints some of them,
   the dead letters and the publish-to-prediction latency, and stops the job;
6. checks what it served: `python -m beam_app.consistency` recomputes every
   logged request's features from the events archive with the batch engine
   (expected: 0 differences) and checks that every archived request has a
   prediction, and `python -m beam_app.drift` compares the
   served features with the model's training statistics (drift.json and an
   HTML report with plots, the consistency summary in it).

    python -m beam_app.local.demo [--model output/model] [--events 300] [--rate 5]

The streaming DirectRunner answers a few requests a second here (see the
README's figures): keep --rate modest, or expect a growing backlog.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE
from beam_app.common.options import ArgumentParser, quiet_tensorflow
from beam_app.common.times import TIME_HELP
from beam_app.local.stack import BigQueryEmulator
from beam_app.local.streaming_stack import (DEAD_LETTERS, EVENTS, PREDICTIONS, SERVED_FEATURES, TOPIC, query,
                                           require_model, stop_job, streaming_stack)

PROG = "python -m beam_app.local.demo"
MALFORMED = (b"{this is not json", '{"event_id": "x", "role": "request"}'.encode())


def wait_for_predictions(bigquery: BigQueryEmulator, job: subprocess.Popen, expected: int, timeout_s: float,
                         progress: bool = True) -> list[dict]:
    """Polls the predictions table until `expected` rows are in; returns them."""
    table = PREDICTIONS.replace(":", ".")
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline and job.poll() is None:
        count = query(bigquery, f"SELECT COUNT(*) AS n FROM `{table}`")[0]["n"]
        if progress:
            print(f"\r  predictions {count:,} of {expected:,}", end="", file=sys.stderr, flush=True)
        if count >= expected:
            break
        time.sleep(1)
    if progress:
        print(file=sys.stderr)
    if count < expected:
        raise RuntimeError(f"only {count} of {expected} predictions within {timeout_s:.0f} s "
                           f"(job {'running' if job.poll() is None else f'exited {job.returncode}'})")
    return query(bigquery, f"SELECT * FROM `{table}` ORDER BY event_time")


def latencies_s(rows: list[dict]) -> list[float]:
    """Publish -> prediction row, per request: with --rebase_to_now an event's
    time is the moment it was published."""
    return sorted((row["processing_time"] - row["event_time"]).total_seconds() for row in rows)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def check_served(model: str, bigquery_endpoint: str, work: Path) -> tuple[dict, dict, int]:
    """The consistency job over the served-features log, the predictions and the events archive
    (every archived request predicted?), then the drift report."""
    import json

    from beam_app import consistency, drift

    print("checking what was served: consistency job, then the drift report ...", flush=True)
    checked = consistency.run(["--runner", "DirectRunner", "--served_features", SERVED_FEATURES,
                               # it waited for every prediction: nothing may still be in flight
                               "--predictions", PREDICTIONS, "--allowed_lateness_s", "0", "--input", EVENTS,
                               "--bigquery_endpoint", bigquery_endpoint, "--output", str(work / "consistency")])
    status = drift.run(["--model", model, "--served_features", SERVED_FEATURES, "--bigquery_endpoint",
                        bigquery_endpoint, "--consistency", str(work / "consistency" / "consistency.json"),
                        "--output", str(work / "drift")])
    return checked, json.loads((work / "drift" / "drift.json").read_text()), status


def run(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", default="output/model", help="Model directory of `make run` (default %(default)s).")
    parser.add_argument("--events", type=int, default=300, help="Flights events to publish (default %(default)s).")
    parser.add_argument("--rate", type=float, default=5,
                        help="Events per second (default %(default)s; the job sustains about 7 here with its "
                             "evidence tables: see the README's figures).")
    parser.add_argument("--start", default="2013-12-02T11:00:00Z", metavar="TIME",
                        help=f"Where in 2013 the replay starts: {TIME_HELP} (default %(default)s: a busy December "
                             "morning).")
    parser.add_argument("--output", default="output/demo",
                        help="Job log, published events, consistency and drift reports (default %(default)s).")
    args = parser.parse_args(argv)
    require_model(args.model, PROG)
    work = Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("starting the emulators and the streaming job ...", flush=True)
    with streaming_stack(args.model, work / "streaming_job.log") as stack:
        from beam_app import publish

        published = publish.run(["--topic", TOPIC, "--start", args.start, "--limit", str(args.events),
                                 "--rate", str(args.rate), "--rebase_to_now",
                                 "--record", str(work / "published.ndjson")])
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for data in MALFORMED:
            publisher.publish(TOPIC, data, event_time=stamp).result()
        requests = sum('"role":"request"' in line for line in (work / "published.ndjson").read_text().splitlines())
        print(f"waiting for {requests} predictions (one per request) ...", flush=True)
        rows = wait_for_predictions(stack.bigquery, stack.job, requests, timeout_s=max(120, 2 * requests))
        time.sleep(2)
        dead = query(stack.bigquery, f"SELECT stage, error, payload FROM `{DEAD_LETTERS.replace(':', '.')}`")
        stop_job(stack.job)
        checks = check_served(args.model, stack.bigquery.endpoint, work)
    log = (work / "streaming_job.log").read_text()
    if "streaming job stopped" in log:  # the job's own summary
        print("streaming job stopped" + log.split("streaming job stopped", 1)[1], end="")
    lat = latencies_s(rows)
    print(f"\npredictions (first 5 of {len(rows)}):")
    for row in rows[:5]:
        print(f"  {row['event_id']:<24} {row['event_time']:%H:%M:%S.%f}  {row['prediction']:8.2f} min  "
              f"model {row['model_version']}")
    print(f"dead letters ({len(dead)}):")
    for row in dead:
        print(f"  {row['stage']:<10} {row['error'][:70]!s:<72} payload {row['payload'][:30]!r}")
    print(f"publish -> prediction latency: p50 {percentile(lat, 50):.2f} s, p99 {percentile(lat, 99):.2f} s "
          f"at {published['rate_achieved']} events/s")
    consistency_summary, drift_summary, drift_status = checks
    print(f"consistency: {consistency_summary['requests_compared']:,} served requests recomputed by the batch engine, "
          f"{consistency_summary['requests_equal']:,} equal, {consistency_summary['differences']:,} differences "
          f"({consistency_summary['differences_unexplained']:,} unexplained); "
          f"{consistency_summary['completeness']['answered']:,} of {consistency_summary['completeness']['requests']:,} "
          f"archived requests predicted -> {work / 'consistency'}/")
    top = drift_summary.get("max") or {}
    print(f"drift: {drift_summary['served']['rows_compared']:,} served rows against the training statistics; "
          f"largest {top.get('measure')} {top.get('value', 0):.3f} ({top.get('feature')}) -> "
          f"{work / 'drift' / 'report.html'}")
    print(f"demo finished in {time.monotonic() - started:.0f} s; job log and published events in {work}/")
    if not consistency_summary["passed"] or drift_status == EXIT_USAGE:
        sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
    quiet_tensorflow()
    run()
