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
    optional: the features each prediction was made from (--served_features_table, a sample by
    --served_features_rate) and every accepted event (--events_table): the evidence that
    `python -m beam_app.consistency` and `python -m beam_app.drift` check.

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
import signal
import sys
import threading
import time
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import SetupOptions, StandardOptions

from beam_app.adapters import load_adapters
from beam_app.serving.kept_model import KeptModelHandler
from beam_app.common.inputs import Input, resolve_inputs
from beam_app.common.options import CommonOptions, configure_logging, pipeline_options, print_help, quiet_tensorflow, wants_help
from beam_app.bigquery.tables import (DEAD_LETTERS_SCHEMA, PREDICTIONS_SCHEMA, check_column_names, dead_letter_row, event_fields,
                             event_row, events_schema, failed_inference_letters, failed_row_letter, in_served_sample,
                             prediction_row, row_table, served_features_row, served_features_schema, table_schema)
from models.export import SpecMismatch
from models.inference import (ModelLocation, WatchLatest, load_checked_model, locate_model,
                              per_request, version_of)
from models.model_updates import WatchLatestModel
from transforms.events import DeadLetter, RawRecord, time_us_to_rfc3339
from transforms.examples import EncodeExamples, decode_example
from transforms.bootstrap import RecentObservations
from transforms.deduplicate import ARRIVED
from transforms.deduplicate import STAGE as DUPLICATE_STAGE
from transforms.deduplicate import DeduplicateEvents
from transforms.event_time import TimeBounds
from transforms.parse import DEAD_LETTERS, LiveStamp, ParseEvents
from transforms.spec import FeatureSpec, SpecError, load_spec
from transforms.windowed_features import WindowedFeatures

_LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner")


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
            "--served_features_table", default=None,
            help="BigQuery table for the features each prediction was made from, decoded from the very "
                 "tf.Example the model scored: one column per feature and presence flag (the schema comes from "
                 "the spec), with event_id, event_time, model_version, spec_fingerprint, processing_time and "
                 "job_start_time. `python -m beam_app.consistency` recomputes them; `python -m beam_app.drift` "
                 "compares them with the training statistics. Default: not logged.")
        parser.add_argument(
            "--served_features_rate", type=float, default=1.0,
            help="Share of requests whose features are logged, chosen by a hash of event_id: the same requests "
                 "in every run, and the consistency job knows which must be there (default 1.0: all).")
        parser.add_argument(
            "--events_table", default=None,
            help="BigQuery table archiving every event the job accepted (requests and observations, the first "
                 "copy of each; not the warm-start history) with its fields and arrival time: history for the "
                 "next training and for the consistency job. Default: not archived.")
        parser.add_argument(
            "--create_tables", action="store_true",
            help="Create the dataset and the tables if missing (otherwise they must exist).")
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
        parser.add_argument(
            "--bootstrap_format", default="auto", choices=("auto", "csv", "json"),
            help="How to read --bootstrap_input; auto: .ndjson/.jsonl/.json are events, anything else CSV.")
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


def message_to_record(message: PubsubMessage) -> RawRecord:
    """A Pub/Sub message -> the record the parser reads; bytes that are not
    UTF-8 become U+FFFD, which the parser turns into a dead letter."""
    text = (message.data or b"").decode("utf-8", errors="replace")
    return RawRecord(f"pubsub:{message.message_id}", text, "json", attributes=dict(message.attributes or {}))


SERVED = "served_features"


class _ToPredictionRow(beam.DoFn):
    """KeyedPredictions (one model call's answers) -> per request (`per_request`:
    exactly one each) a predictions table row, and (tagged SERVED) for the
    requests in the sample, the example it was made from, decoded: what the
    model received, not what we think we sent it. One step for both, as each
    step costs the streaming DirectRunner per bundle."""

    def __init__(self, spec: FeatureSpec, clock: Callable[[], float], served_rate: Optional[float] = None,
                 job_started_us: int = 0):
        self._spec = spec
        self._clock = clock  # injectable: tests pin processing_time
        self._served_rate = served_rate
        self._job_started_us = job_started_us
        self._rows = Metrics.counter("predictions", "rows")
        self._served = Metrics.counter("predictions", "served_features_rows")

    def process(self, predictions):
        now_us = int(self._clock() * 1e6)
        for key, result in per_request(predictions):
            self._rows.inc()
            yield prediction_row(key, result.inference, result.model_id, self._spec.fingerprint, now_us, "streaming")
            if self._served_rate is not None and in_served_sample(key.event_id, self._served_rate):
                self._served.inc()
                yield beam.pvalue.TaggedOutput(SERVED, served_features_row(
                    key, decode_example(self._spec, result.example), result.model_id, self._spec.fingerprint,
                    now_us, self._job_started_us))


class _ToEventRow(beam.DoFn):
    """An accepted Event -> an events table row, stamped with its arrival (wall clock)."""

    def __init__(self, spec: FeatureSpec, clock: Callable[[], float]):
        self._names = tuple(event_fields(spec))
        self._clock = clock
        self._rows = Metrics.counter("events", "archived")

    def process(self, event):
        self._rows.inc()
        yield event_row(event, self._names, int(self._clock() * 1e6))


class _ToDeadLetterRow(beam.DoFn):
    """DeadLetter -> a dead-letter table row, counted per stage."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._counters = {}

    def process(self, dead: DeadLetter):
        if dead.stage not in self._counters:
            self._counters[dead.stage] = Metrics.counter("dead_letters", dead.stage)
        self._counters[dead.stage].inc()
        yield dead_letter_row(dead, int(self._clock() * 1e6))


def bootstrap_inputs(spec: FeatureSpec, value: str) -> list[Input]:
    """--bootstrap_input: one or more (comma-separated) paths, each SOURCE=PATH or a plain path."""
    return resolve_inputs(spec, [part.strip() for part in value.split(",") if part.strip()])


def build(messages, spec: FeatureSpec, model_path: str, allowed_lateness_s: int = 3600,
          key_shards: Optional[int] = None, release_step_ms: int = 1000, inference_batch_size: int = 1024,
          clock: Callable[[], float] = time.time, max_future_s: int = 300,
          event_time_attribute: str = "event_time", history=None, watch: Optional[WatchLatest] = None,
          served_rate: Optional[float] = None, archive_events: bool = False, job_started_us: int = 0) -> dict:
    """PCollection[PubsubMessage] (stamped with their publish time) ->
    {"predictions": PCollection[predictions row dict], "dead_letters": PCollection[DeadLetter]}. No I/O.
    history: a bounded PCollection[Event] of observations to warm the feature state with (bootstrap).
    watch: the model directory to follow (its LATEST): newer versions of the same spec take over.
    served_rate: also "served_features", rows of the features a sample of the predictions were made
    from (job_started_us: when this job started, in each row); archive_events: also "events", a row
    per accepted live event."""
    live = LiveStamp(event_time_attribute, TimeBounds(max_future_s, allowed_lateness_s))
    parsed = messages | "ParseEvents" >> ParseEvents(spec, live=live, to_record=message_to_record)
    events = parsed["events"] if history is None else (parsed["events"], history)
    unique = events | "DeduplicateEvents" >> DeduplicateEvents(
        spec.max_window_s + allowed_lateness_s, key_shards)
    examples = (
        unique["events"]
        | "WindowedFeatures" >> WindowedFeatures(spec, allowed_lateness_s, key_shards, release_step_ms)
        | "EncodeExamples" >> EncodeExamples(spec, with_label=False, keyed=True, max_batch_size=inference_batch_size)
    )
    # Each encoded batch is one element and one model call, until each request gets its prediction.
    predicted, failed = examples | "RunInference" >> RunInference(
        KeptModelHandler(model_path, spec, watch=watch)).with_exception_handling()
    refused_models = [messages | "WatchModel" >> WatchLatestModel(
        watch.model_dir, spec, version_of(model_path), watch.poll_s, watch.clock)] if watch else []
    failed_inferences = failed.failed_inferences | "InferenceDeadLetters" >> beam.FlatMapTuple(
        failed_inference_letters)
    rows = predicted | "ToPredictionRows" >> beam.ParDo(
        _ToPredictionRow(spec, clock, served_rate, job_started_us)).with_outputs(SERVED, main="predictions")
    outputs = {
        "predictions": rows.predictions,
        "dead_letters": ((parsed[DEAD_LETTERS], unique[DUPLICATE_STAGE], failed_inferences, *refused_models)
                         | "MergeDeadLetters" >> beam.Flatten()),
    }
    if served_rate is not None:
        outputs[SERVED] = rows[SERVED]
    if archive_events:
        outputs["events"] = unique[ARRIVED] | "ToEventRows" >> beam.ParDo(_ToEventRow(spec, clock))
    return outputs


def _write_rows(rows, label: str, table, schema, test_client, insert_shards: Optional[int] = None
                ) -> beam.PCollection:
    """Streaming inserts with an explicit schema; returns the refused rows as
    (destination, row, errors). Only transient errors are retried: the
    default retries a bad row forever. insert_shards: keys per table before
    the insertAll calls (None: Beam's default)."""
    shards = {} if insert_shards is None else {"num_streaming_keys": insert_shards - 1}  # Beam: randint(0, n)
    result = rows | label >> WriteToBigQuery(
        table=table, schema=schema, method=WriteToBigQuery.Method.STREAMING_INSERTS,
        create_disposition=BigQueryDisposition.CREATE_NEVER, write_disposition=BigQueryDisposition.WRITE_APPEND,
        insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR, test_client=test_client, **shards)
    return result.failed_rows_with_errors


class _Destinations:
    """Which table a row goes to (`row_table`), and that table's schema
    (WriteToBigQuery's dynamic destinations: a plain object, so it pickles).
    tables: {"predictions"|"dead_letters"|"served_features"|"events": (table spec, schema fields)}."""

    def __init__(self, tables: dict[str, tuple[str, tuple]]):
        from beam_app.bigquery.client import parse_table_spec

        self._tables = {name: table for name, (table, _) in tables.items()}
        self._schemas = {parse_table_spec(table): table_schema(schema) for table, schema in tables.values()}

    def table(self, row: dict) -> str:
        return self._tables[row_table(row)]

    def schema(self, destination) -> dict:
        from beam_app.bigquery.client import parse_table_spec

        return self._schemas[parse_table_spec(str(destination))]


class _LogUnwritable(beam.DoFn):
    """Dead letters the dead-letter table refused: the end of the line, so
    they go to the worker log in full, and a counter."""

    def __init__(self):
        self._unwritable = Metrics.counter("dead_letters", "unwritable")

    def process(self, failed):
        self._unwritable.inc()
        logging.error("dead letter refused by BigQuery (%s): %s; errors: %s", *failed)


def write_outputs(outputs: dict, tables: dict[str, tuple[str, tuple]], test_client=None,
                  clock: Callable[[], float] = time.time, insert_shards: Optional[int] = None) -> None:
    """Every row to its table (`job_tables`) through one WriteToBigQuery (each
    of its steps costs the DirectRunner per bundle, even an empty one); rows
    BigQuery refuses become dead letters, written by a second.
    insert_shards: keys per table before the insertAll calls (`insert_shards`; None: Beam's 500)."""
    destinations = _Destinations(tables)
    dead_letter_table = tables["dead_letters"][0]
    dead_letter_rows = outputs["dead_letters"] | "ToDeadLetterRows" >> beam.ParDo(_ToDeadLetterRow(clock))
    rows = [outputs[name] for name in ("predictions", SERVED, "events") if name in outputs]
    refused = _write_rows((*rows, dead_letter_rows) | "AllRows" >> beam.Flatten(), "WriteRows",
                          destinations.table, destinations.schema, test_client, insert_shards)
    refused_predictions, refused_dead_letters = refused | "SplitRefused" >> beam.Partition(
        lambda failed, _: int(row_table(failed[1]) == "dead_letters"), 2)
    refused_rows = (
        refused_predictions
        | "RefusedPredictions" >> beam.MapTuple(failed_row_letter)
        | "RefusedToDeadLetterRows" >> beam.ParDo(_ToDeadLetterRow(clock))
    )
    unwritable = _write_rows(refused_rows, "WriteRefusedRows", dead_letter_table,
                             table_schema(DEAD_LETTERS_SCHEMA), test_client, insert_shards)
    (refused_dead_letters, unwritable) | "Unwritable" >> beam.Flatten() | "LogUnwritable" >> beam.ParDo(
        _LogUnwritable())


class UsageError(ValueError):
    """A flag is missing or wrong: the message says which and what to give."""


def _check_options(options: StreamingOptions) -> None:
    if bool(options.input_subscription) == bool(options.input_topic):
        raise UsageError("give exactly one of --input_subscription projects/P/subscriptions/S "
                         "or --input_topic projects/P/topics/T")
    for flag in ("model", "predictions_table", "dead_letter_table"):
        if not getattr(options, flag):
            raise UsageError(f"--{flag} is required (see --help)")
    if options.id_attribute and options.view_as(StandardOptions).runner in _LOCAL_RUNNERS:
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
    if not 0 < options.served_features_rate <= 1:
        raise UsageError(f"--served_features_rate is a share of requests, above 0 and at most 1: got "
                         f"{options.served_features_rate}")
    named = [table for table in (options.predictions_table, options.dead_letter_table,
                                 options.served_features_table, options.events_table) if table]
    if len(set(named)) != len(named):
        raise UsageError("each table flag needs a table of its own: " + ", ".join(named))


def key_shards(options: StreamingOptions) -> Optional[int]:
    """--key_shards, with the DirectRunner's default of 1 (see its help)."""
    if options.key_shards is not None:
        if options.key_shards < 0:
            raise UsageError(f"--key_shards must be 0 (a state per key value) or more, got {options.key_shards}")
        return options.key_shards or None
    return 1 if options.view_as(StandardOptions).runner in _LOCAL_RUNNERS else None


def insert_shards(options: StreamingOptions) -> Optional[int]:
    """--insert_shards, with the DirectRunner's default of 1 (see its help); None: Beam's default."""
    if options.insert_shards is not None:
        if options.insert_shards < 1:
            raise UsageError(f"--insert_shards must be 1 or more, got {options.insert_shards}")
        return options.insert_shards
    return 1 if options.view_as(StandardOptions).runner in _LOCAL_RUNNERS else None


def job_tables(options: StreamingOptions, spec: FeatureSpec) -> dict[str, tuple[str, tuple]]:
    """The tables this job writes: {name: (table spec, schema fields)}."""
    tables = {"predictions": (options.predictions_table, PREDICTIONS_SCHEMA),
              "dead_letters": (options.dead_letter_table, DEAD_LETTERS_SCHEMA)}
    if options.served_features_table:
        tables[SERVED] = (options.served_features_table, served_features_schema(spec))
    if options.events_table:
        tables["events"] = (options.events_table, events_schema(spec))
    return tables


def prepare_tables(tables: dict[str, tuple[str, tuple]], endpoint: Optional[str], create: bool) -> None:
    """Creates the tables (`create`: --create_tables) or checks that they
    exist, so a typo fails at start rather than as endless insert errors.
    tables: {name: (table spec, schema fields)}, as `job_tables` gives them."""
    from beam_app.bigquery.client import bigquery_client, ensure_table, parse_table_spec, table_exists

    for table, schema in tables.values():
        project, _, _ = parse_table_spec(table)
        client = bigquery_client(project, endpoint)
        if create:
            ensure_table(client, table, schema)
            continue
        if not table_exists(client, table):
            raise UsageError(f"BigQuery table {table} does not exist: run with --create_tables, "
                             "or create it as the README's deployment section shows")


def _table_counts(options: StreamingOptions, since_us: int, deadline_s: float = 10) -> dict:
    """Rows written to each table since the job started: the DirectRunner
    reports no metrics for streaming pipelines, BigQuery does. A BigQuery that
    does not answer fails within `deadline_s` (the client's own retry would
    wait 600 s)."""
    from google.api_core.retry import Retry

    from beam_app.bigquery.client import bigquery_client, parse_table_spec

    since = time_us_to_rfc3339(since_us)
    counts = {}
    counted = [("predictions", options.predictions_table, "model_version"),
               ("dead_letters", options.dead_letter_table, "stage")]
    counted += [(name, table, group) for name, table, group in (
        (SERVED, options.served_features_table, "model_version"), ("events", options.events_table, "role")) if table]
    for name, table, group in counted:
        project, dataset, table_id = parse_table_spec(table)
        sql = (f"SELECT {group}, COUNT(*) AS n FROM `{project}.{dataset}.{table_id}` "
               f"WHERE processing_time >= TIMESTAMP('{since}') GROUP BY {group}")
        client = bigquery_client(project, options.bigquery_endpoint)
        job = client.query(sql, retry=Retry(deadline=deadline_s), job_retry=None, timeout=deadline_s)
        rows = job.result(timeout=deadline_s, retry=Retry(deadline=deadline_s))
        counts[name] = {row[group]: row["n"] for row in rows}
    if SERVED in counts:  # one count: by version it says what the predictions' counts say
        counts[SERVED] = sum(counts[SERVED].values())
    # Predictions: the total, and per model version (a running job may switch).
    counts["predictions_by_version"] = counts["predictions"]
    counts["predictions"] = sum(counts["predictions_by_version"].values())
    return counts


def settle(counts: Callable[[], object], quiet_s: float, max_s: float,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Waits until `counts()` has not changed for `quiet_s`, or `max_s` has
    passed; True when it settled. The streaming DirectRunner cannot be drained:
    this is how a stop lets the requests the watermark has already passed
    reach their table before the process goes."""
    started = clock()
    last, last_change = counts(), clock()
    while clock() - started < max_s:
        if clock() - last_change >= quiet_s:
            return True
        sleep(min(0.25, quiet_s))
        now = counts()
        if now != last:
            last, last_change = now, clock()
    return clock() - last_change >= quiet_s


def _cancel_in_background(result, wait_s: float) -> None:
    """result.cancel() waits for the Pub/Sub reader's blocked pull (up to 30 s):
    give it `wait_s`, then leave it to the daemon thread. Messages it pulled
    and did not ack are redelivered to the next job (at least once): its
    de-duplication starts empty, so a request among them is answered again
    there; the stop's settle keeps that to what was still in flight."""
    thread = threading.Thread(target=result.cancel, name="cancel-pipeline", daemon=True)
    thread.start()
    thread.join(wait_s)


def construct(pipeline: beam.Pipeline, options: StreamingOptions, spec: FeatureSpec, location: ModelLocation,
              clock: Callable[[], float] = time.time, test_client=None) -> None:
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
    served_rate = options.served_features_rate if options.served_features_table else None
    outputs = build(messages, spec, location.saved_model, options.allowed_lateness_s, key_shards(options),
                    options.release_step_ms, options.inference_batch_size, clock, options.max_future_s,
                    options.event_time_attribute, history, watch, served_rate, bool(options.events_table),
                    job_started_us=int(clock() * 1e6))
    write_outputs(outputs, job_tables(options, spec), test_client, clock, insert_shards(options))


def run(argv: Optional[list[str]] = None, stop: Optional[threading.Event] = None,
        clock: Callable[[], float] = time.time) -> dict:
    """Starts the streaming job. On the DirectRunner it runs until --duration_s,
    Ctrl-C or `stop` is set, lets what is in flight reach BigQuery (at most
    2.5 s), and returns the summary: a stop takes a few seconds. On Dataflow
    it returns once the job is submitted."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    options = StreamingOptions(argv)
    options.view_as(StandardOptions).streaming = True
    options.view_as(SetupOptions).save_main_session = False
    _check_options(options)
    started = time.monotonic()
    spec = load_spec(options.spec)
    # Start with the version LATEST names now, and refuse a model of another spec now; later versions
    # are checked and swapped in by WatchLatestModel.
    location = locate_model(options.model)
    load_checked_model(location.saved_model, spec)
    if options.served_features_table or options.events_table:
        check_column_names(spec)
    prepare_tables(job_tables(options, spec), options.bigquery_endpoint, options.create_tables)
    test_client = None
    if options.bigquery_endpoint:
        from beam_app.bigquery.client import EndpointBigQueryClient, parse_table_spec

        test_client = EndpointBigQueryClient(parse_table_spec(options.predictions_table)[0], options.bigquery_endpoint)

    pipeline = beam.Pipeline(options=options)
    construct(pipeline, options, spec, location, clock, test_client)
    started_us = int(clock() * 1e6)
    result = pipeline.run()
    summary = {"spec": {"name": spec.name, "fingerprint": spec.fingerprint}, "model": location.saved_model,
               "model_version": location.version, "input": options.input_subscription or options.input_topic,
               "predictions_table": options.predictions_table, "dead_letter_table": options.dead_letter_table,
               "served_features_table": options.served_features_table, "events_table": options.events_table}
    logging.info("streaming job started: spec %s (%s), model version %s, reading %s",
                 spec.name, spec.fingerprint[:12], location.version, summary["input"])
    if options.view_as(StandardOptions).runner not in _LOCAL_RUNNERS:
        job_id = getattr(result, "job_id", lambda: None)()
        summary["job_id"] = job_id
        print(f"submitted streaming job {job_id}; it runs until you drain or cancel it", flush=True)
        return summary
    written = lambda: _table_counts(options, started_us, deadline_s=2)  # noqa: E731
    try:
        _wait(options.duration_s, started, stop or threading.Event(), written)
        logging.info("stopping: writing what the watermark has passed")
        settle(written, quiet_s=1.0, max_s=2.5)
    except KeyboardInterrupt:
        logging.info("interrupted again: stopping now")
    finally:
        _cancel_in_background(result, wait_s=0.5)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary.update(_table_counts(options, started_us, deadline_s=5))
    _print_summary(summary)
    return summary


def _wait(duration_s: float, started: float, stop: threading.Event, counts: Callable[[], dict],
          every_s: float = 30) -> None:
    """Blocks until duration_s (0: forever) or `stop`, logging what has been written."""
    next_report = time.monotonic() + every_s
    while not duration_s or time.monotonic() - started < duration_s:
        if stop.wait(0.5):
            return
        if time.monotonic() >= next_report:
            next_report += every_s
            try:
                written = counts()
            except Exception as err:  # noqa: BLE001 - a progress line must not stop the job
                logging.warning("running %.0f s; could not count the rows written: %s", time.monotonic() - started,
                                err)
                continue
            logging.info("running %.0f s: %d predictions, dead letters %s", time.monotonic() - started,
                         written["predictions"], written["dead_letters"] or 0)


def _print_summary(summary: dict) -> None:
    dead, by_version = summary["dead_letters"], summary.get("predictions_by_version", {})
    print("\n".join([
        f"streaming job stopped after {summary['seconds']} s",
        f"  model               {summary['model_version']}  ({summary['model']})",
        f"  spec                {summary['spec']['name']} {summary['spec']['fingerprint'][:12]}",
        f"  predictions         {summary['predictions']:>9,}   -> {summary['predictions_table']}"
        + (f"  (by model version: {', '.join(f'{v} {n:,}' for v, n in sorted(by_version.items()))})"
           if len(by_version) > 1 else ""),
        f"  dead letters        {sum(dead.values()):>9,}   -> {summary['dead_letter_table']}"
        + (f"  ({', '.join(f'{stage} {n:,}' for stage, n in sorted(dead.items()))})" if dead else ""),
        *([f"  served features     {summary[SERVED]:>9,}   -> {summary['served_features_table']}"]
          if SERVED in summary else []),
        *([f"  events archived     {sum(summary['events'].values()):>9,}   -> {summary['events_table']}  ("
           + ", ".join(f"{role} {n:,}" for role, n in sorted(summary["events"].items())) + ")"]
          if "events" in summary else []),
    ]), flush=True)


def main() -> None:
    quiet_tensorflow()
    if {"-h", "--help"} & set(sys.argv[1:]):
        print_help("python -m beam_app.streaming", __doc__, (CommonOptions, StreamingOptions),
                   "Any Apache Beam pipeline option is accepted too: --runner (DirectRunner here, DataflowRunner), "
               "--project, --region, --temp_location, ...")
        return
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # a second Ctrl-C: do not wait for the tables
            raise KeyboardInterrupt
        logging.info("%s: stopping (again to stop at once)", signal.Signals(signum).name)
        stop.set()

    # Ctrl-C and SIGTERM (docker stop, a supervisor) stop the DirectRunner job the same way.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        run(sys.argv[1:], stop=stop)
    except (UsageError, SpecError, SpecMismatch, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    # The DirectRunner's Pub/Sub reader may sit in a 30 s pull that nobody
    # will use: do not wait for it at interpreter exit.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
