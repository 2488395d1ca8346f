"""What one Dataflow worker would sustain: the streaming job's own steps
(`beam_app.streaming.build`: parse with its live checks, the streaming
de-duplication ledger, the stateful point-in-time features and join, the
encoder, RunInference on the SavedModel, the prediction / served-features /
events / dead-letter rows) on the FnApiRunner, Beam's portable runner
in-process (one SDK worker, one thread: one vCPU), over a bounded replay.

The replay is the embedded flights data from --start_time: each event becomes
the Pub/Sub message the publisher would send (`beam_app.pubsub.replay.build_message`),
stamped with its event time as its publish time (a TimestampedValue). The
input is marked unbounded, so `DeduplicateEvents` and `WindowedFeatures` take
their streaming branches (state and event-time timers; the runner fires the
timers as the watermark advances); the outputs go to a counting sink, not to
BigQuery.

Two replay sizes are timed in one run; the rate between them (extra events
over extra seconds) leaves out the fixed costs of a run (pipeline start, the
model load) as a long-running worker would. It does NOT include what Dataflow
adds around the DoFns: the Pub/Sub read and ack, Streaming Engine's shuffle
between the stateful steps, the state backend's read/write latency (here the
state is in memory), the BigQuery streaming inserts, checkpointing, and the
runner harness's own share of the CPU. So the per-vCPU figure is an upper
bound for the DoFns' work, and the worker counts are extrapolated from it
linearly (keys spread evenly, no hot key).

    python bench/fnapi_streaming_bench.py [--model output/model] [--events 3000,12000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VCPUS_PER_WORKER = 2  # n1-standard-2
TARGETS = (1_000, 10_000, 100_000)  # events/s
START_TIME = "2013-12-02"
SINK = "sink"  # the namespace of this bench's own counters: rows per output


def load_replay(spec, start_time: str, limit: int) -> list:
    """The first `limit` flights events from `start_time`, in event-time order."""
    from beam_app.adapters import load_adapters
    from beam_app.common.inputs import resolve_inputs
    from beam_app.pubsub.replay import load_events, select
    from transforms.parse import RecordParser
    from transforms.read_files import matched_files, read_records
    from transforms.spec import parse_utc_date

    inputs = resolve_inputs(spec, [])
    files = [(path, i.source_name) for i in inputs for path in matched_files(i.pattern)]
    loaded = load_events((r for path, source in files for r in read_records(path, "auto", source)),
                         RecordParser(spec, load_adapters(spec)))
    start = parse_utc_date(start_time, "--start_time")
    return select(loaded.events, int(start.timestamp()) * 1_000_000 + start.microsecond, limit).events


class _Count(object):
    """A counting sink per output: a Beam counter, nothing written."""

    def __init__(self, name: str):
        from transforms.counters import Counter

        self._counter = Counter(SINK, name).metric()

    def __call__(self, _row):
        self._counter.inc()
        return None


def replay(spec, model: str, events: list, inference_batch_size: int, state_cache_mb: int = 0) -> dict:
    """One run of the streaming steps over `events` on the FnApiRunner -> counts and seconds.
    state_cache_mb: the SDK worker's state cache; 0 (off) is what Dataflow's workers run with
    (`--max_cache_memory_usage_mb` defaults to 0), where the FnApiRunner's embedded worker has 100."""
    import apache_beam as beam
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers

    from beam_app import streaming
    from beam_app.pubsub.replay import build_message

    messages = []
    for number, event in enumerate(events):
        message = build_message(event)
        messages.append(beam.window.TimestampedValue(
            PubsubMessage(message.data, message.attributes, message_id=str(number)),
            beam.utils.timestamp.Timestamp(micros=event.time_us)))
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))
    source = pipeline | "Replay" >> beam.Create(messages, reshuffle=False)
    source.is_bounded = False  # the streaming branches: state and event-time timers, as on Pub/Sub
    outputs = streaming.build(source, spec, model, key_shards=None, release_step_ms=1000,
                              inference_batch_size=inference_batch_size, served_fraction=1.0, archive_events=True,
                              clock=lambda: 0.0)
    for name, rows in outputs.items():
        rows | f"Count_{name}" >> beam.Map(_Count(name))
    worker_handlers.STATE_CACHE_SIZE_MB = state_cache_mb  # read when the embedded worker starts
    started = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - started
    counts = {counter.key.metric.name: counter.committed
              for counter in result.metrics().query()["counters"] if counter.key.metric.namespace == SINK}
    return {"events": len(events), "state_cache_mb": state_cache_mb, "requests": sum(event.role == "request" for event in events),
            "seconds": round(seconds, 2), "rows": counts}


def sizing_table(per_vcpu: float, measured_cold: float) -> list[tuple[str, str, str]]:
    """(what, figure, measured | extrapolated) rows."""
    per_worker = per_vcpu * VCPUS_PER_WORKER
    rows = [("events/s on one vCPU, whole run (start and model load included)", f"{measured_cold:,.0f}", "measured"),
            ("events/s on one vCPU, steady (between the two replay sizes)", f"{per_vcpu:,.0f}", "measured"),
            (f"events/s per n1-standard-2 worker ({VCPUS_PER_WORKER} vCPU)", f"{per_worker:,.0f}", "extrapolated")]
    for target in TARGETS:
        rows.append((f"workers for {target:,} events/s", f"{max(1, math.ceil(target / per_worker)):,}",
                     "extrapolated"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "output" / "model"))
    parser.add_argument("--spec", default="flights")
    parser.add_argument("--start_time", default=START_TIME)
    parser.add_argument("--events", default="5000,20000", help="Two replay sizes, smaller first.")
    parser.add_argument("--cache_on_mb", type=int, default=100,
                        help="The state cache of one more run of the smaller size, to compare with Dataflow's "
                             "default (off); 100 is the FnApiRunner's own. 0: no such run.")
    parser.add_argument("--inference_batch_size", type=int, default=1024)
    args = parser.parse_args()
    os.environ.setdefault("NO_GCE_CHECK", "true")
    from beam_app.common.options import quiet_tensorflow
    from models.inference import load_checked_model, locate_model
    from transforms.spec import load_spec

    quiet_tensorflow()
    spec = load_spec(args.spec)
    if not Path(args.model).exists():
        sys.exit(f"no model at {args.model}: run `make run` first")
    location = locate_model(args.model)
    load_checked_model(location.saved_model, spec)
    small, large = (int(n) for n in args.events.split(","))
    events = load_replay(spec, args.start_time, large)
    if len(events) < large:
        sys.exit(f"only {len(events)} events from {args.start_time}")
    load = os.getloadavg()
    runs = [replay(spec, location.saved_model, events[:n], args.inference_batch_size) for n in (small, large)]
    cached = (replay(spec, location.saved_model, events[:small], args.inference_batch_size, args.cache_on_mb)
              if args.cache_on_mb else None)
    load_after = os.getloadavg()
    for run in runs + ([cached] if cached else []):
        predictions = run["rows"].get("predictions", 0)
        ok = predictions == run["requests"]
        print(f"  {run['events']:>7,} events ({run['requests']:,} requests), state cache {run['state_cache_mb']} MB: "
              f"{run['seconds']:>7.1f} s, "
              f"{run['events'] / run['seconds']:>7,.0f} events/s; rows {run['rows']}"
              f"{'' if ok else '  (predictions != requests!)'}", flush=True)
    a, b = runs
    steady = (b["events"] - a["events"]) / (b["seconds"] - a["seconds"])
    cold = b["events"] / b["seconds"]
    if cached:
        print(f"  state cache {args.cache_on_mb} MB over off, same {small:,} events: "
              f"{cached['seconds'] / a['seconds']:.2f}x the time")
    print(f"\nstreaming steps on the FnApiRunner (one SDK worker, in memory, state cache off as on Dataflow), "
          f"flights from {args.start_time}, "
          f"load average {load[0]:.2f} before, {load_after[0]:.2f} after (1 min; {os.cpu_count()} cores)")
    table = sizing_table(steady, cold)
    width = max(len(what) for what, _, _ in table)
    for what, figure, kind in table:
        print(f"  {what:<{width}}  {figure:>8}  {kind}")
    print("  not included: Pub/Sub read/ack, Streaming Engine shuffle between the stateful steps, state backend "
          "latency (state here is in memory), BigQuery inserts, checkpointing, the harness's own CPU; worker "
          "counts assume linear scaling and no hot key")
    out = ROOT / "bench" / "results" / "fnapi_streaming_bench.json"
    out.write_text(json.dumps({"runs": runs, "steady_events_per_s_per_vcpu": round(steady, 1),
                               "cold_events_per_s": round(cold, 1), "cache_on_run": cached, "load_average": [load[0], load_after[0]],
                               "table": table, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
