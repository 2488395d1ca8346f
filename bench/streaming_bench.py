"""Streaming benchmark on the DirectRunner with both emulators, in one session:

1. sustained throughput: a backlog of --backlog events published at once
   (rebased to now), timed from the first event to the last prediction row;
2. publish -> prediction latency (p50, p99) with events published at
   --rate events/s (the issue's 100), and at --sustainable_rate;
3. the same two figures for a pass-through pipeline (ReadFromPubSub -> a row
   per request -> the same BigQuery write), the ceiling of the runner and
   emulators without features or the model;
4. throughput and latency at --sustainable_rate of the job without its
   evidence tables (--served_features, --events_table), to show what
   logging the served features and archiving the events cost.

Latency is a prediction row's processing_time minus its event time, which
--rebase_to_now makes the moment the event was scheduled for publishing
(rows are stamped just before the insert: the insert itself is not counted).

    python bench/streaming_bench.py [--model output/model]   # needs `make run` (the model) and `make venv-bq`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beam_app.local.demo import latencies_s, percentile, wait_for_predictions  # noqa: E402
from beam_app.local.streaming_stack import (DEAD_LETTERS, PREDICTIONS, SUBSCRIPTION, TOPIC,  # noqa: E402
                                            streaming_job_command, streaming_stack)

TARGET_P50_S, TARGET_P99_S = 2.0, 5.0
START_TIME = "2013-12-02T11:00:00Z"  # a busy December morning


def without_evidence_command(model: str, bigquery_endpoint: str) -> list[str]:
    """The demo's job command without the served-features log and the events archive."""
    command = streaming_job_command(model, bigquery_endpoint)
    for flag in ("--served_features", "--events_table"):
        at = command.index(flag)
        del command[at:at + 2]
    return command


def passthrough_command(model: str, bigquery_endpoint: str) -> list[str]:
    return [sys.executable, __file__, "--passthrough_job", bigquery_endpoint]


def passthrough_job(bigquery_endpoint: str) -> None:
    """Read, one row per request, the streaming job's own BigQuery write: nothing else."""
    import apache_beam as beam
    from apache_beam.io.gcp.pubsub import ReadFromPubSub
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_app import streaming
    from beam_app.bigquery.client import EndpointBigQueryClient, bigquery_client, ensure_table
    from beam_app.bigquery.write import write_outputs
    from beam_app.bigquery.tables import DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, prediction_row
    from transforms.events import rfc3339_to_time_us
    from transforms.examples import RequestKey

    client = bigquery_client("test-project", bigquery_endpoint)
    ensure_table(client, PREDICTIONS, PREDICTIONS_SCHEMA)
    ensure_table(client, DEAD_LETTERS, DEAD_LETTERS_SCHEMA)

    def to_row(message):
        key = RequestKey(message.attributes["event_id"], rfc3339_to_time_us(message.attributes["event_time"]))
        return prediction_row(key, 0.0, "passthrough", "-", int(time.time() * 1e6), "streaming")

    pipeline = beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner", "--streaming"]))
    requests = (pipeline
                | ReadFromPubSub(subscription=SUBSCRIPTION, with_attributes=True, timestamp_attribute="event_time")
                | beam.Filter(lambda message: message.attributes.get("role") == "request")
                | beam.Map(to_row))
    write_outputs({"predictions": requests, "dead_letters": pipeline | beam.Create([])},
                  {"predictions": (PREDICTIONS, PREDICTIONS_SCHEMA), "dead_letters": (DEAD_LETTERS, DEAD_LETTERS_SCHEMA)},
                  EndpointBigQueryClient("test-project", bigquery_endpoint),
                  insert_shards=streaming.insert_shards(streaming.StreamingOptions(["--runner", "DirectRunner"])))
    result = pipeline.run()
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        result.cancel()
        os._exit(0)


def publish(events: int, rate: float, record: Path) -> dict:
    """The publisher in its own process (as a user runs it), not competing for this one's GIL."""
    subprocess.run([sys.executable, "-m", "beam_app.publish", "--topic", TOPIC, "--start", START_TIME,
                    "--limit", str(events), "--rate", str(rate), "--rebase_to_now", "--record", str(record)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    return {"requests": sum('"role":"request"' in line for line in record.read_text().splitlines()),
            "events": events}


def measure(kind: str, model: str, work: Path, events: int, rate: float) -> dict:
    """One fresh stack and job; `events` published at `rate` (0: all at once)."""
    command = {"streaming job": streaming_job_command, "job, no evidence": without_evidence_command,
               "pass-through": passthrough_command}[kind]
    with streaming_stack(model, work / f"{kind.replace(' ', '_')}_{rate:g}.log", command) as stack:
        published_at = time.time()
        sent = publish(events, rate, work / "published.ndjson")
        rows = wait_for_predictions(stack.bigquery, stack.job, sent["requests"], timeout_s=900, progress=False)
    first = min(row["event_time"] for row in rows).timestamp()
    last = max(row["processing_time"] for row in rows).timestamp()
    lat = latencies_s(rows)
    span_s = last - first
    figures = {"kind": kind, "rate": rate, "events": events, "requests": sent["requests"],
               "events_per_s": round(events / span_s, 1), "requests_per_s": round(len(rows) / span_s, 1),
               "latency_p50_s": round(percentile(lat, 50), 2), "latency_p99_s": round(percentile(lat, 99), 2),
               "wall_s": round(time.time() - published_at, 1)}
    print(f"  {kind:<14} {'backlog' if not rate else f'{rate:g}/s':>8}: {figures['events_per_s']:>7} events/s, "
          f"latency p50 {figures['latency_p50_s']} s, p99 {figures['latency_p99_s']} s", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "output" / "model"))
    parser.add_argument("--backlog", type=int, default=1000, help="Events published at once for throughput.")
    parser.add_argument("--rate", type=float, default=100, help="Events/s for the latency target (default 100).")
    parser.add_argument("--sustainable_rate", type=float, default=10, help="A rate the DirectRunner keeps up with.")
    parser.add_argument("--latency_events", type=int, default=600, help="Events per latency run.")
    parser.add_argument("--passthrough_job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passthrough_job:
        passthrough_job(args.passthrough_job)
        return
    if not Path(args.model).exists():
        sys.exit(f"no model at {args.model}: run `make run` first")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("pass-through", "streaming job"):
            runs.append(measure(kind, args.model, Path(tmp), args.backlog, 0))
            for rate in (args.rate, args.sustainable_rate):
                runs.append(measure(kind, args.model, Path(tmp), args.latency_events, rate))
        runs.append(measure("job, no evidence", args.model, Path(tmp), args.backlog, 0))
        runs.append(measure("job, no evidence", args.model, Path(tmp), args.latency_events, args.sustainable_rate))
    by = {(run["kind"], run["rate"]): run for run in runs}
    ceiling, job = by[("pass-through", 0)], by[("streaming job", 0)]
    at_target = by[("streaming job", args.rate)]
    print("\nstreaming on the DirectRunner with the Pub/Sub and BigQuery emulators (2 cores)")
    print(f"  {'':<36}{'pass-through':>14}{'streaming job':>15}{'job / ceiling':>15}")
    print(f"  {'sustained events/s (backlog)':<36}{ceiling['events_per_s']:>14}{job['events_per_s']:>15}"
          f"{job['events_per_s'] / ceiling['events_per_s']:>15.2f}")
    for rate in (args.rate, args.sustainable_rate):
        a, b = by[("pass-through", rate)], by[("streaming job", rate)]
        print(f"  {f'latency p50 / p99 s at {rate:g} events/s':<36}{a['latency_p50_s']:>7} / {a['latency_p99_s']:<5}"
              f"{b['latency_p50_s']:>8} / {b['latency_p99_s']:<5}")
    plain, plain_rate = by[("job, no evidence", 0)], by[("job, no evidence", args.sustainable_rate)]
    rate_job = by[("streaming job", args.sustainable_rate)]
    print(f"  without the evidence tables: {plain['events_per_s']} events/s (backlog), latency p50 / p99 "
          f"{plain_rate['latency_p50_s']} / {plain_rate['latency_p99_s']} s at {args.sustainable_rate:g} events/s; "
          f"with them {job['events_per_s'] / plain['events_per_s']:.2f}x the throughput, "
          f"p50 {rate_job['latency_p50_s']} s")
    met = at_target["latency_p50_s"] < TARGET_P50_S and at_target["latency_p99_s"] < TARGET_P99_S
    print(f"  target at {args.rate:g} events/s: p50 < {TARGET_P50_S} s, p99 < {TARGET_P99_S} s: "
          f"{'met' if met else 'NOT met'}")
    out = ROOT / "bench" / "results" / "streaming_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
