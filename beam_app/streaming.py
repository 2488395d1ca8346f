"""Streaming branch: live events from Pub/Sub -> the same windowed features as
the batch branch -> the trained SavedModel -> predictions in BigQuery.

    Pub/Sub (JSON event, event_time attribute; stamped with the publish time)
      -> ParseEvents (the batch parser; event time checked, then stamped)   -> dead letters
      -> DeduplicateEvents (once per (event_id, role); conflicting copies)  -> dead letters
      -> WindowedFeatures(spec) (the batch transform: point-in-time [t - W, t))
      -> EncodeExamples (the batch encoder, no label; each encoded batch one KeyedBatch element)
      -> RunInference (SavedModel, serving_default once per KeyedBatch)     -> dead letters
      -> ToPredictionRows (per_request: exactly one prediction per request)
      -> WriteToBigQuery predictions (streaming inserts) -> refused rows: dead letters
    dead letters -> WriteToBigQuery dead-letter table (payload, attributes, error, time)
    optional: the features each prediction was made from (--served_features, a sample by
    --served_features_fraction) and every accepted event (--events_table): the evidence that
    `python -m beam_app.consistency` and `python -m beam_app.drift` check.
    optional: the online store (--online_table, Bigtable): every accepted observation (the
    warm-start history too) and the stream's progress, which `python -m beam_app.serve` answers from.

It refuses to start when the model was trained on another spec than --spec.
Requests get their prediction once the watermark passes their event time.

Run against real Pub/Sub and BigQuery on the DirectRunner:

    python -m beam_app.streaming --input_subscription projects/P/subscriptions/S \\
        --model output/model --predictions_table P:features.predictions \\
        --dead_letter_table P:features.dead_letters --create_tables

or against the local emulators (see `python -m beam_app.local.stack` and the
README's streaming demo) by adding --bigquery_endpoint http://127.0.0.1:PORT with
PUBSUB_EMULATOR_HOST set. On Dataflow it runs as a flex template (templates/).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.io.gcp.pubsub import ReadFromPubSub
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DebugOptions, SetupOptions, StandardOptions, WorkerOptions

from beam_app.adapters import load_adapters
from beam_app.bigquery.counts import table_counts
from beam_app.bigquery.tables import SERVED_FEATURES, check_column_names, failed_inference_letters
from beam_app.bigquery.write import Tables, job_tables, prepare_tables, write_outputs
from beam_app.common.errors import EXIT_USAGE, UsageError
from beam_app.common.inputs import Input, add_format_argument, resolve_inputs
from beam_app.common.options import (CommonOptions, configure_logging, pipeline_options, print_help, quiet_tensorflow,
                                     wants_help)
from beam_app.common.runner import is_local_runner
from beam_app.online.bigtable_store import StoreMismatch, prepare_store
from beam_app.online.layout import parse_table_path
from beam_app.online.write import WriteOnlineStore
from beam_app.serving.kept_model import KeptModelHandler
from beam_app.serving.rows import ToEventRows, ToPredictionRows, message_to_record
from beam_app.serving.stop import stop_on_signals, stop_when_settled
from models.inference import ModelLocation, WatchLatest, load_checked_model, locate_model, version_of
from models.model_updates import WatchLatestModel
from transforms import counters
from transforms.bootstrap import RecentObservations
from transforms.command_line import restore_stderr
from transforms.deduplicate import ARRIVED
from transforms.deduplicate import STAGE as DUPLICATE_STAGE
from transforms.deduplicate import DeduplicateEvents
from transforms.event_time import TimeBounds
from transforms.events import time_us_to_rfc3339
from transforms.examples import EncodeExamples
from transforms.parse import DEAD_LETTERS, LiveStamp, ParseEvents
from transforms.spec import REQUEST, FeatureSpec, SpecError, load_spec
from transforms.windowed_features import WindowedFeatures


class StreamingOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input_subscription", default=None,
            help="Pub/Sub subscription to read events from: projects/<project>/subscriptions/<name>.")
        parser.add_argument(
            "--input_topic", default=None,
            help="Or a topic (projects/<project>/topics/<name>): the job reads through a subscription of its own "
                 "and sees only what is published after it starts.")
        parser.add_argument(
            "--event_time_attribute", default="event_time",
            help="Message attribute holding the event time (RFC 3339 or ms since the epoch); it must equal the "
                 "payload's event_time. A message without it, or with a value that is not a time or disagrees, is "
                 "a dead letter (default: event_time).")
        parser.add_argument(
            "--max_future_s", type=int, default=300,
            help="An event more than this many seconds after its publish time (a wrong clock, a typo in the "
                 "year) is a dead letter instead of waiting for the watermark to reach it (default 300).")
        parser.add_argument(
            "--id_attribute", default=None,
            help="Message attribute unique per message, for de-duplication of redelivered messages at the source "
                 "(Dataflow only; the publisher sets message_key). The job de-duplicates by (event_id, role) "
                 "itself in any case; the DirectRunner refuses this flag.")
        parser.add_argument(
            "--model", default=None,
            help="The trained model: the --model_dir of `python -m models.train` (its LATEST version is used), a "
                 "version directory in it, or a saved_model directory; local or gs://.")
        parser.add_argument(
            "--model_poll_s", type=float, default=60,
            help="How often to read the model directory's LATEST: a new version trained on the same spec takes "
                 "over without a restart, one of another spec is refused (a dead letter) and the serving model "
                 "stays (default 60; 0: keep the version found at start). Only when --model is a model directory.")
        parser.add_argument(
            "--predictions_table", default=None,
            help="BigQuery table for predictions: <project>:<dataset>.<table> (or <project>.<dataset>.<table>).")
        parser.add_argument(
            "--dead_letter_table", default=None,
            help="BigQuery table for dead letters (rejected messages, failed inferences, refused rows).")
        parser.add_argument(
            "--served_features", default=None,
            help="The served-features log: a BigQuery table for the features each prediction was made from, "
                 "decoded from the very "
                 "tf.Example the model scored: one column per feature and presence flag (the schema comes from "
                 "the spec), with event_id, event_time, model_version, spec_fingerprint, processing_time and "
                 "job_start_time. `python -m beam_app.consistency` recomputes them; `python -m beam_app.drift` "
                 "compares them with the training statistics. Default: not logged.")
        parser.add_argument(
            "--served_features_fraction", type=float, default=1.0,
            help="Share of requests whose features are logged (above 0, at most 1), chosen by a hash of "
                 "event_id: the same requests in every run, and the consistency job knows which must be there "
                 "(default 1.0: all).")
        parser.add_argument(
            "--events_table", default=None,
            help="BigQuery table archiving every event the job accepted (requests and observations, the first "
                 "copy of each; not the warm-start history) with its fields and arrival time: history for the "
                 "next training and for the consistency job. Default: not archived.")
        parser.add_argument(
            "--online_table", default=None,
            help="The online store: a Bigtable table, projects/<project>/instances/<instance>/tables/<table>, "
                 "kept with every accepted observation within the longest window plus --allowed_lateness_s "
                 "(with --bootstrap_input, the history's too) and the stream's progress; `python -m "
                 "beam_app.serve` answers from it. BIGTABLE_EMULATOR_HOST points it at the emulator. "
                 "Default: none kept.")
        parser.add_argument(
            "--create_tables", action="store_true",
            help="Create the dataset and the tables if missing (otherwise they must exist), and the "
                 "--online_table.")
        parser.add_argument(
            "--bigquery_endpoint", default=None,
            help="BigQuery API endpoint, e.g. http://127.0.0.1:9050 for the local emulator. Default: Google's.")
        parser.add_argument(
            "--bootstrap_input", default=None,
            help="Warm start: history files (a path or glob, local or gs://: CSV through the adapter of the spec's "
                 "first source, SOURCE=PATH for another source, or NDJSON events such as the publisher's --record; "
                 "several separated by commas) whose observations of the last max(window) plus "
                 "--allowed_lateness_s are loaded into the feature state before any request is answered, so the "
                 "first requests after a (re)start see full windows.")
        add_format_argument(parser, "--bootstrap_format", "--bootstrap_input")
        parser.add_argument(
            "--allowed_lateness_s", type=int, default=3600,
            help="How far behind the watermark a request may arrive and still get exact features (default 3600).")
        parser.add_argument(
            "--key_shards", type=int, default=None,
            help="State shards per feature group: 0 keeps one state per key value (the most parallel: the default "
                 "on Dataflow); N hashes key values into N states. Default on the DirectRunner: 1, since every "
                 "state's timer firing there is a bundle through every later step.")
        parser.add_argument(
            "--release_step_ms", type=int, default=1000,
            help="Requests are answered when the watermark passes the end of their step of event time: one timer "
                 "firing per state and step instead of one per event time, for up to a step of latency "
                 "(default 1000; 0: per event time).")
        parser.add_argument(
            "--inference_batch_size", type=int, default=1024,
            help="Largest batch of examples per model call (default 1024): EncodeExamples' batches, "
                 "each a model call.")
        parser.add_argument(
            "--insert_shards", type=int, default=None,
            help="Keys per BigQuery table that the streaming inserts are grouped by before each insertAll call: "
                 "a call takes the rows of one key in one bundle. Default on the DirectRunner: 1, so the rows of "
                 "a bundle go in one call instead of one call each (every key there is a bundle of its own); "
                 "elsewhere Beam's 500.")
        parser.add_argument(
            "--duration_s", type=float, default=0,
            help="DirectRunner only: stop after this many seconds and print the summary (default: run until "
                 "Ctrl-C).")


def bootstrap_inputs(spec: FeatureSpec, value: str) -> list[Input]:
    """--bootstrap_input: one or more (comma-separated) paths, each SOURCE=PATH or a plain path."""
    return resolve_inputs(spec, [part.strip() for part in value.split(",") if part.strip()])


def build(messages, spec: FeatureSpec, model_path: str, *, allowed_lateness_s: int = 3600,
          key_shards: Optional[int] = None, release_step_ms: int = 1000, inference_batch_size: int = 1024,
          clock: Callable[[], float] = time.time, max_future_s: int = 300,
          event_time_attribute: str = "event_time", history=None, watch: Optional[WatchLatest] = None,
          served_fraction: Optional[float] = None, archive_events: bool = False, job_started_us: int = 0,
          tally: Optional[str] = None) -> dict:
    """PCollection[PubsubMessage] (stamped with their publish time) ->
    {"predictions": PCollection[predictions row dict], "dead_letters": PCollection[DeadLetter],
    "accepted": PCollection[Event], each identity once (the online store's input)}. No I/O.
    history: a bounded PCollection[Event] of observations to warm the feature state with (bootstrap).
    watch: the model directory to follow (its LATEST): newer versions of the same spec take over.
    served_fraction: also "served_features", rows of the features a sample of the predictions were made
    from (job_started_us: when this job started, in each row); archive_events: also "events", a row
    per accepted live event. tally: a process-wide tally (transforms/counters.py) that the messages
    read, the events accepted and the feature state's keys are counted into, for the local summary."""
    live = LiveStamp(event_time_attribute, TimeBounds(max_future_s, allowed_lateness_s))
    parsed = messages | "ParseEvents" >> ParseEvents(spec, live=live, to_record=message_to_record, tally=tally)
    events = parsed["events"] if history is None else (parsed["events"], history)
    unique = events | "DeduplicateEvents" >> DeduplicateEvents(
        spec.max_window_s + allowed_lateness_s, key_shards, tally=tally)
    examples = (
        unique["events"]
        | "WindowedFeatures" >> WindowedFeatures(spec, allowed_lateness_s, key_shards, release_step_ms, tally=tally)
        | "EncodeExamples" >> EncodeExamples(spec, with_label=False, max_batch_size=inference_batch_size)
    )
    # Each encoded batch is one element and one model call, until each request gets its prediction.
    predicted, failed = examples | "RunInference" >> RunInference(
        KeptModelHandler(model_path, spec, watch=watch)).with_exception_handling()
    refused_models = [messages | "WatchModel" >> WatchLatestModel(
        watch.model_dir, spec, version_of(model_path), watch.poll_s, watch.clock)] if watch else []
    failed_inferences = failed.failed_inferences | "InferenceDeadLetters" >> beam.FlatMapTuple(
        failed_inference_letters)
    rows = predicted | "ToPredictionRows" >> beam.ParDo(ToPredictionRows(
        spec, clock, "streaming", served_fraction, job_started_us)).with_outputs(SERVED_FEATURES, main="predictions")
    outputs = {
        "accepted": unique["events"],
        "predictions": rows.predictions,
        "dead_letters": ((parsed[DEAD_LETTERS], unique[DUPLICATE_STAGE], failed_inferences, *refused_models)
                         | "MergeDeadLetters" >> beam.Flatten()),
    }
    if served_fraction is not None:
        outputs[SERVED_FEATURES] = rows[SERVED_FEATURES]
    if archive_events:
        outputs["events"] = unique[ARRIVED] | "ToEventRows" >> beam.ParDo(ToEventRows(spec, clock))
    return outputs


def read_and_answered(tally: dict[str, int], written: dict) -> dict:
    """The local job's own counts (`counters.tallied`) beside what its tables hold:
    what it read, what it accepted, how many requests it answered, and its feature
    state. A request read and not answered (nor a failed inference) was in flight
    when the job stopped; the DirectRunner acked it when it pulled it."""
    accepted = counters.family(tally, counters.accepted)
    duplicates = sum(counters.family(tally, counters.duplicates).values())
    requests = accepted.get(REQUEST, 0)
    answered = written["predictions"] + written["dead_letters"].get("inference", 0)
    return {
        "read": {"messages": counters.RECORDS_READ.of(tally), "accepted": accepted, "identical_copies": duplicates},
        "requests_unanswered": max(0, requests - answered),
        "feature_state": {"live_keys": counters.LIVE_KEYS.of(tally), "cleared": counters.STATE_CLEARED.of(tally),
                          "rebuilt_from_log": counters.HISTORIES_REBUILT.of(tally)},
    }


def state_cache_mb(options) -> int:
    """The SDK harness's state cache the flags ask for: --max_cache_memory_usage_mb, or
    Beam's older --experiments state_cache_size=N (as the worker reads them)."""
    for experiment in options.view_as(DebugOptions).experiments or []:
        if experiment.startswith("state_cache_size="):
            return int(experiment.partition("=")[2] or 0)
    return options.view_as(WorkerOptions).max_cache_memory_usage_mb or 0


def _check_options(options: StreamingOptions) -> None:
    if state_cache_mb(options):
        raise UsageError(
            "leave Beam's state cache off (--max_cache_memory_usage_mb 0, Dataflow's default): with it on, Beam "
            "weighs every state value it caches by walking it and the globals of every loaded module, which made "
            "this job about 15 times slower (docs/performance.md, \"Beam's state cache\"). The job keeps what its "
            "firings read in memory itself")
    if bool(options.input_subscription) == bool(options.input_topic):
        raise UsageError("give exactly one of --input_subscription projects/P/subscriptions/S "
                         "or --input_topic projects/P/topics/T")
    for flag in ("model", "predictions_table", "dead_letter_table"):
        if not getattr(options, flag):
            raise UsageError(f"--{flag} is required (see --help)")
    if options.id_attribute and is_local_runner(options):
        raise UsageError("--id_attribute works on Dataflow only: the DirectRunner's Pub/Sub reader cannot "
                         "de-duplicate at the source. Leave it out here; the job still de-duplicates by "
                         "(event_id, role) itself")
    if options.bootstrap_input:
        from transforms.read_files import matched_files

        for source in bootstrap_inputs(load_spec(options.spec), options.bootstrap_input):
            try:
                matched_files(source.pattern)
            except FileNotFoundError:
                raise UsageError(f"--bootstrap_input {source.pattern!r} matches no file") from None
    if options.max_future_s < 0 or options.allowed_lateness_s < 0:
        raise UsageError("--max_future_s and --allowed_lateness_s must be 0 or more")
    if options.online_table:
        try:
            parse_table_path(options.online_table)
        except ValueError as err:
            raise UsageError(f"--online_table: {err}") from None
    if not 0 < options.served_features_fraction <= 1:
        raise UsageError(f"--served_features_fraction is a share of requests, above 0 and at most 1: got "
                         f"{options.served_features_fraction}")
    named = [table for table in (options.predictions_table, options.dead_letter_table,
                                 options.served_features, options.events_table) if table]
    if len(set(named)) != len(named):
        raise UsageError("each table flag needs a table of its own: " + ", ".join(named))


def key_shards(options: StreamingOptions) -> Optional[int]:
    """--key_shards, with the DirectRunner's default of 1 (see its help)."""
    if options.key_shards is not None:
        if options.key_shards < 0:
            raise UsageError(f"--key_shards must be 0 (a state per key value) or more, got {options.key_shards}")
        return options.key_shards or None
    return 1 if is_local_runner(options) else None


def insert_shards(options: StreamingOptions) -> Optional[int]:
    """--insert_shards, with the DirectRunner's default of 1 (see its help); None: Beam's default."""
    if options.insert_shards is not None:
        if options.insert_shards < 1:
            raise UsageError(f"--insert_shards must be 1 or more, got {options.insert_shards}")
        return options.insert_shards
    return 1 if is_local_runner(options) else None


def tables_of(options: StreamingOptions, spec: FeatureSpec) -> Tables:
    """The tables the flags name: {name: (table spec, schema fields)} (`job_tables`)."""
    return job_tables(spec, predictions=options.predictions_table, dead_letters=options.dead_letter_table,
                      served_features=options.served_features, events=options.events_table)


def construct(pipeline: beam.Pipeline, options: StreamingOptions, spec: FeatureSpec, location: ModelLocation,
              clock: Callable[[], float] = time.time, test_client=None, tally: Optional[str] = None) -> None:
    """Every step of the job, as run() submits it (the offline Dataflow
    translation test builds it the same way): the Pub/Sub read, the warm
    start, the model watch, `build` and the writes. Reads nothing itself."""
    # Stamped with the publish time, not timestamp_attribute: see transforms/event_time.py.
    messages = pipeline | "ReadFromPubSub" >> ReadFromPubSub(
        subscription=options.input_subscription, topic=options.input_topic, with_attributes=True,
        id_label=options.id_attribute)
    history = None
    if options.bootstrap_input:
        since_us = int(clock() * 1e6) - (spec.max_window_s + options.allowed_lateness_s) * 1_000_000
        adapters = load_adapters(spec)
        sources = bootstrap_inputs(spec, options.bootstrap_input)
        parts = [pipeline | ("Bootstrap" if index == 0 else f"Bootstrap_{index}") >> RecentObservations(
            spec, source.pattern, since_us, options.bootstrap_format, adapters, source.source_name)
            for index, source in enumerate(sources)]
        history = parts[0] if len(parts) == 1 else parts | "MergeBootstrap" >> beam.Flatten()
        logging.info("warm start: observations since %s from %s", time_us_to_rfc3339(since_us),
                     options.bootstrap_input)
    watch = WatchLatest(options.model, options.model_poll_s, clock) if (
        options.model_poll_s and location.from_latest) else None
    outputs = build(
        messages, spec, location.saved_model, allowed_lateness_s=options.allowed_lateness_s,
        key_shards=key_shards(options), release_step_ms=options.release_step_ms,
        inference_batch_size=options.inference_batch_size, clock=clock, max_future_s=options.max_future_s,
        event_time_attribute=options.event_time_attribute, history=history, watch=watch,
        served_fraction=options.served_features_fraction if options.served_features else None,
        archive_events=bool(options.events_table), job_started_us=int(clock() * 1e6), tally=tally)
    write_outputs(outputs, tables_of(options, spec), test_client, clock, insert_shards(options))
    if options.online_table:
        outputs["accepted"] | "WriteOnlineStore" >> WriteOnlineStore(spec, options.online_table)


def run(argv: Optional[list[str]] = None, stop: Optional[threading.Event] = None,
        clock: Callable[[], float] = time.time) -> dict:
    """Starts the streaming job. On the DirectRunner it runs until --duration_s,
    Ctrl-C or `stop` is set, lets what is in flight reach BigQuery (at most
    2.5 s), and returns the summary: a stop takes a few seconds. On Dataflow
    it returns once the job is submitted."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    options = pipeline_options(StreamingOptions, argv)
    options.view_as(StandardOptions).streaming = True
    options.view_as(SetupOptions).save_main_session = False
    _check_options(options)
    started = time.monotonic()
    spec = load_spec(options.spec)
    # Start with the version LATEST names now, and refuse a model of another spec now; later versions
    # are checked and swapped in by WatchLatestModel.
    location = locate_model(options.model)
    load_checked_model(location.saved_model, spec)
    if options.served_features or options.events_table:
        check_column_names(spec)
    written_to = tables_of(options, spec)
    prepare_tables(written_to, options.bigquery_endpoint, options.create_tables)
    if options.online_table:
        try:
            prepare_store(parse_table_path(options.online_table), spec.fingerprint, spec.max_window_s,
                          options.allowed_lateness_s, options.create_tables)
        except StoreMismatch as err:
            raise UsageError(str(err)) from None
    test_client = None
    if options.bigquery_endpoint:
        from beam_app.bigquery.client import EndpointBigQueryClient, parse_table_spec

        test_client = EndpointBigQueryClient(parse_table_spec(options.predictions_table)[0], options.bigquery_endpoint)

    pipeline = beam.Pipeline(options=options)
    # The local runner's summary reads the job's own tally; on Dataflow the job's metrics say it all.
    tally = uuid.uuid4().hex if is_local_runner(options) else None
    construct(pipeline, options, spec, location, clock, test_client, tally)
    started_us = int(clock() * 1e6)
    result = pipeline.run()
    summary = {"spec": {"name": spec.name, "fingerprint": spec.fingerprint}, "model": location.saved_model,
               "model_version": location.version, "input": options.input_subscription or options.input_topic,
               "predictions_table": options.predictions_table, "dead_letter_table": options.dead_letter_table,
               "served_features_table": options.served_features, "events_table": options.events_table,
               "online_table": options.online_table}
    logging.info("streaming job started: spec %s (%s), model version %s, reading %s",
                 spec.name, spec.fingerprint[:12], location.version, summary["input"])
    if not is_local_runner(options):
        job_id = getattr(result, "job_id", lambda: None)()
        summary["job_id"] = job_id
        print(f"submitted streaming job {job_id}; it runs until you drain or cancel it", flush=True)
        return summary
    written = lambda: table_counts(written_to, options.bigquery_endpoint, started_us, deadline_s=2)  # noqa: E731
    stop_when_settled(result, written, options.duration_s, started, stop or threading.Event())
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary.update(table_counts(written_to, options.bigquery_endpoint, started_us, deadline_s=5))
    summary.update(read_and_answered(counters.tallied(tally), summary))
    counters.forget(tally)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    dead, by_version = summary["dead_letters"], summary.get("predictions_by_version", {})
    read, state, unanswered = summary["read"], summary["feature_state"], summary["requests_unanswered"]
    print("\n".join([
        f"streaming job stopped after {summary['seconds']} s",
        f"  model               {summary['model_version']}  ({summary['model']})",
        f"  spec                {summary['spec']['name']} {summary['spec']['fingerprint'][:12]}",
        f"  read                {read['messages']:>9,}   messages; accepted "
        + (", ".join(f"{role} {n:,}" for role, n in sorted(read["accepted"].items())) or "none")
        + f"; identical copies {read['identical_copies']:,}",
        *([f"  NOT ANSWERED        {unanswered:>9,}   requests read but neither predicted nor a dead letter: in "
           f"flight at the stop, and acked by this runner when read (docs/howto.md, \"What a crash costs\")"]
          if unanswered else []),
        f"  predictions         {summary['predictions']:>9,}   -> {summary['predictions_table']}"
        + (f"  (by model version: {', '.join(f'{v} {n:,}' for v, n in sorted(by_version.items()))})"
           if len(by_version) > 1 else ""),
        f"  dead letters        {sum(dead.values()):>9,}   -> {summary['dead_letter_table']}"
        + (f"  ({', '.join(f'{stage} {n:,}' for stage, n in sorted(dead.items()))})" if dead else ""),
        *([f"  served features     {summary[SERVED_FEATURES]:>9,}   -> {summary['served_features_table']}"]
          if SERVED_FEATURES in summary else []),
        *([f"  events archived     {sum(summary['events'].values()):>9,}   -> {summary['events_table']}  ("
           + ", ".join(f"{role} {n:,}" for role, n in sorted(summary["events"].items())) + ")"]
          if "events" in summary else []),
        *([f"  online store        {summary['online_table']}"] if summary.get("online_table") else []),
        f"  feature state       {state['live_keys']:>9,}   live keys ({state['cleared']:,} ended; "
        f"{state['rebuilt_from_log']:,} firings read their log back)",
    ]), flush=True)


PROG = "python -m beam_app.streaming"
OPTION_CLASSES = (CommonOptions, StreamingOptions)
BEAM_FLAGS = ("Any Apache Beam pipeline option is accepted too: --runner (DirectRunner here, DataflowRunner), "
              "--project, --region, --temp_location, ...")


def main() -> None:
    quiet_tensorflow()
    if wants_help(sys.argv[1:]):
        print_help(PROG, __doc__, OPTION_CLASSES, BEAM_FLAGS)
        return
    from models.export import SpecMismatch  # imports TensorFlow: after quiet_tensorflow, and not for --help

    stop = threading.Event()
    try:
        with stop_on_signals(stop):
            run(sys.argv[1:], stop=stop)
    except (UsageError, SpecError, SpecMismatch, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    # The DirectRunner's Pub/Sub reader may sit in a 30 s pull that nobody
    # will use: do not wait for it at interpreter exit.
    logging.shutdown()
    sys.stdout.flush()
    restore_stderr()  # os._exit skips atexit: the stderr filter writes out what it holds first
    os._exit(0)


if __name__ == "__main__":
    main()
