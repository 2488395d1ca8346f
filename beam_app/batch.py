"""Batch branch: event history -> training examples with point-in-time features.

Reads history (the spec's embedded data set by default: the 336,776 NYC
flights of 2013, or with --spec chicago_taxi 15,002 Chicago taxi trips),
computes every windowed feature of the spec with the same `WindowedFeatures`
transform the streaming job uses, and writes under --output:

    train/ eval/ test/   examples-*.tfrecord.gz  (gzipped tf.train.Example)
    dead_letters/        dead_letters-*.ndjson   (raw record, reason, source)
    spec.json            the spec, its fingerprint and the example layout
    stats.json           per split and example column: counts, missing, moments, quantiles,
                         histogram, top values (transforms/feature_stats.py; --no_stats skips it)
    summary.json         the counts and timings printed at the end

Run on the embedded data:

    python -m beam_app.batch --runner DirectRunner
    python -m beam_app.batch --runner DirectRunner --spec chicago_taxi --output output/chicago_taxi

or on your own files (CSV through the spec's adapter, or NDJSON events):

    python -m beam_app.batch --runner DirectRunner --input 'data/*.ndjson' --output out/
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, SetupOptions, StandardOptions

from beam_app.adapters import load_adapters
from beam_app.bigquery.read import (QUERY_INPUT, Endpoints, ReadBigQueryRecords, check_table, is_bigquery_input,
                                     parse_input_table)
from beam_app.common.job_report import clear_outputs, counters, heartbeat, write_json
from beam_app.common.options import (CommonOptions, Input, add_input_arguments, configure_logging, print_help,
                              quiet_tensorflow, resolve_inputs)
from transforms.deduplicate import STAGE as DUPLICATE_STAGE
from transforms.deduplicate import DeduplicateEvents
from transforms.examples import EncodeRecordBatches, RecordBatches, example_columns, is_labeled
from transforms.feature_stats import FeatureStatistics, statistics_document
from transforms.events import datetime_to_time_us
from transforms.parse import DEAD_LETTERS, ParseEvents, role_counter
from transforms.read_files import ReadRecords, matched_files
from transforms.spec import SPLITS, FeatureSpec, SpecError, SplitSpec, load_spec, parse_utc_date, validate_split
from transforms.split import SplitExamples
from transforms.windowed_features import WindowedFeatures



class BatchOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_input_arguments(parser, "History to read", bigquery=True)
        parser.add_argument(
            "--output", default="./output",
            help="Directory for the TFRecords, dead letters, spec.json and summary.json (default: ./output). "
                 "Earlier outputs of this job in it are replaced.")
        parser.add_argument(
            "--split", default=None, choices=("time", "hash"),
            help="time: by request time at --eval_start/--test_start (UTC); hash: stable on event_id, "
                 "by --eval_fraction/--test_fraction. Default: the spec's split.")
        parser.add_argument("--eval_start", default=None, help="Time split: first eval day, e.g. 2013-11-01.")
        parser.add_argument("--test_start", default=None, help="Time split: first test day, e.g. 2013-12-01.")
        parser.add_argument("--eval_fraction", type=float, default=None, help="Hash split: share of eval.")
        parser.add_argument("--test_fraction", type=float, default=None, help="Hash split: share of test.")
        parser.add_argument(
            "--no_stats", action="store_true", default=False,
            help="Do not compute the training statistics (stats.json); for measuring what they cost.")


class _KeepLabeled(beam.DoFn):
    """Requests whose outcome is unknown (a cancelled flight) cannot train: counted, not written."""

    def __init__(self, spec: FeatureSpec):
        self._spec = spec
        self._unlabeled = beam.metrics.Metrics.counter("examples", "unlabeled_requests")

    def process(self, row):
        if is_labeled(self._spec, row):
            yield row
        else:
            self._unlabeled.inc()


STATS = "stats"


def build(records, spec: FeatureSpec, split: SplitSpec, with_stats: bool = True) -> dict:
    """PCollection[RawRecord] -> {"train"|"eval"|"test": PCollection[bytes] of
    serialized tf.Examples, "dead_letters": PCollection[DeadLetter]} and, with
    stats, "stats": PCollection[dict], one element: the stats.json document,
    computed from the same RecordBatches the examples are encoded from. No I/O."""
    parsed = records | "ParseEvents" >> ParseEvents(spec, adapters=load_adapters(spec))
    unique = parsed["events"] | "DeduplicateEvents" >> DeduplicateEvents(horizon_s=0)
    rows = (
        unique["events"]
        | "WindowedFeatures" >> WindowedFeatures(spec)
        | "KeepLabeled" >> beam.ParDo(_KeepLabeled(spec))
    )
    splits = rows | "Split" >> SplitExamples(split)
    batches = {name: splits[name] | f"RecordBatches{name.title()}" >> RecordBatches(spec) for name in SPLITS}
    outputs = {name: batches[name] | f"Encode{name.title()}" >> EncodeRecordBatches() for name in SPLITS}
    outputs[DEAD_LETTERS] = (parsed[DEAD_LETTERS], unique[DUPLICATE_STAGE]) | "MergeDeadLetters" >> beam.Flatten()
    if with_stats:
        per_split = {name: batches[name] | f"Stats{name.title()}" >> FeatureStatistics(spec) for name in SPLITS}
        outputs[STATS] = (
            records.pipeline
            | "StatsOnce" >> beam.Create([None])
            | "StatsDocument" >> beam.Map(
                lambda _, *entries: statistics_document(spec, dict(zip(SPLITS, entries))),
                *(beam.pvalue.AsSingleton(per_split[name]) for name in SPLITS))
        )
    return outputs


def split_from_options(spec: FeatureSpec, options: BatchOptions) -> SplitSpec:
    """The spec's split with the command line's overrides applied."""
    changes = {}
    if options.split:
        changes["method"] = options.split
    for name in ("eval_start", "test_start"):
        if getattr(options, name):
            changes[name] = parse_utc_date(getattr(options, name), f"--{name}")
    for name in ("eval_fraction", "test_fraction"):
        if getattr(options, name) is not None:
            changes[name] = getattr(options, name)
    split = dataclasses.replace(spec.split, **changes)
    validate_split(split)
    return split


def use_all_cores_locally(options: BatchOptions, argv: list[str]) -> None:
    """On the DirectRunner, default to one worker process per core (about 1.7x
    faster on 2 cores than the single in-process worker); flags still win.
    Read from argv: Beam's options cannot tell an explicit default from none."""
    runner = options.view_as(StandardOptions).runner
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--direct_")}
    if runner in (None, "DirectRunner", "direct") and "--direct_num_workers" not in given:
        direct = options.view_as(DirectOptions)
        direct.direct_num_workers = os.cpu_count() or 1
        if "--direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing"


def summarize(counters: dict[str, int], spec: FeatureSpec) -> dict:
    """The counts a user reads, and whether they add up (nothing lost silently)."""
    c = lambda name: counters.get(name, 0)  # noqa: E731
    examples = {name: c(f"split/examples_{name}") for name in SPLITS}
    duplicates = {role: c(f"duplicates/{role}") for role in spec.roles}
    conflicts = {role: c(f"conflicts/{role}") for role in spec.roles}
    by_kind = {kind.name: c(f"parse/{role_counter(kind.name)}") for kind in spec.kinds}
    summary = {
        "records_read": c("parse/records_read"),
        "dead_letters": c("parse/dead_letters") + sum(conflicts.values()),
        "duplicates": duplicates,
        "conflicts": conflicts,
        "requests": c("parse/requests"),
        "observations": sum(by_kind.values()),
        **({"observations_by_kind": by_kind} if len(by_kind) > 1 else {}),
        "feature_rows": c("windowed_features/feature_rows"),
        "unlabeled_requests": c("examples/unlabeled_requests"),
        "examples": examples,
        "late_requests": c("windowed_features/late_requests"),
        "late_observations": c("windowed_features/late_observations"),
    }
    checks = {
        "records_read == records parsed + dead_letters":
            c("parse/records_read") == c("parse/records_ok") + c("parse/dead_letters"),
        "feature_rows == requests - duplicates - conflicts":
            c("windowed_features/feature_rows") == c("parse/requests") - duplicates["request"] - conflicts["request"],
        "feature_rows == examples + unlabeled_requests":
            c("windowed_features/feature_rows") == sum(examples.values()) + c("examples/unlabeled_requests"),
        "examples encoded == examples split": c("examples/encoded") == sum(examples.values()),
    }
    summary["checks"] = checks
    return summary


def bigquery_endpoints(options) -> Optional[Endpoints]:
    """--bigquery_endpoint and --bigquery_grpc_endpoint, both or neither (Google's)."""
    rest, grpc = getattr(options, "bigquery_endpoint", None), getattr(options, "bigquery_grpc_endpoint", None)
    if (rest is None) != (grpc is None):
        raise SpecError("BigQuery inputs at another endpoint need both --bigquery_endpoint (REST) and "
                        "--bigquery_grpc_endpoint (the Storage Read API): the read uses both")
    return Endpoints(rest, grpc) if rest is not None else None


def _input_time_us(options, name: str) -> Optional[int]:
    text = getattr(options, name, None)
    if text is None:
        return None
    return datetime_to_time_us(parse_utc_date(text, f"--{name}"))


def read_inputs(pipeline: beam.Pipeline, inputs: list[Input], options):
    """Every input's RawRecords, in one PCollection: files through ReadRecords,
    BigQuery tables and --input_query through ReadBigQueryRecords. `options`:
    any options object with add_input_arguments' flags (bigquery=True for
    BigQuery inputs)."""
    query = getattr(options, "input_query", None)
    since_us, until_us = _input_time_us(options, "input_since"), _input_time_us(options, "input_until")
    tables = [i for i in inputs if is_bigquery_input(i.pattern)]
    if (since_us is not None or until_us is not None) and not tables:
        raise SpecError("--input_since/--input_until filter BigQuery inputs (bq:TABLE or --input_query) only")
    if query is not None and not any(i.pattern == QUERY_INPUT for i in inputs):
        raise SpecError("--input_query given but not among the inputs: resolve_inputs(spec, options.input, "
                        "query=options.input_query, bigquery=True)")
    endpoints = bigquery_endpoints(options) if tables else None
    project = options.view_as(GoogleCloudOptions).project

    def read(i: Input):
        if i.pattern == QUERY_INPUT:
            return ReadBigQueryRecords(query=query, since_us=since_us, until_us=until_us, endpoints=endpoints,
                                       project=project)
        if is_bigquery_input(i.pattern):
            return ReadBigQueryRecords(table=i.pattern, since_us=since_us, until_us=until_us, endpoints=endpoints,
                                       project=project)
        return ReadRecords(i.pattern, options.input_format, i.source_name)

    def label(index: Optional[int], i: Input) -> str:
        if is_bigquery_input(i.pattern):
            return "ReadBigQuery" if index is None else f"ReadBigQuery_{index}"
        return "ReadRecords" if index is None else f"ReadRecords_{index}_{i.source_name or 'events'}"

    if len(inputs) == 1:
        return pipeline | label(None, inputs[0]) >> read(inputs[0])
    return ([pipeline | label(index, i) >> read(i) for index, i in enumerate(inputs)]
            | "MergeInputs" >> beam.Flatten())


def input_names(inputs: list[Input], options) -> list[str]:
    """What the summary's "input" lists: the files each glob matches (raising
    FileNotFoundError when none), the BigQuery tables (checked to exist with
    the columns of events: SpecError saying what to do) and "bq:query: SQL"."""
    names = []
    for i in inputs:
        if i.pattern == QUERY_INPUT:
            names.append(f"{QUERY_INPUT}: {getattr(options, 'input_query', None)}")
        elif is_bigquery_input(i.pattern):
            check_table(parse_input_table(i.pattern), bigquery_endpoints(options))
            names.append(i.pattern)
        else:
            names.extend(matched_files(i.pattern))
    return names


def construct(pipeline: beam.Pipeline, options: BatchOptions, spec: FeatureSpec, split: SplitSpec,
              inputs: list[Input], output: str) -> None:
    """Every step of the job, as run() runs it (the offline Dataflow translation
    test builds it the same way): the read, `build` and the writes."""
    outputs = build(read_inputs(pipeline, inputs, options), spec, split,
                    with_stats=not options.no_stats)
    for name in SPLITS:
        outputs[name] | f"Write{name.title()}" >> beam.io.WriteToTFRecord(
            FileSystems.join(output, name, "examples"), file_name_suffix=".tfrecord.gz")
    (outputs[DEAD_LETTERS]
     | "DeadLettersToJson" >> beam.Map(lambda dead: dead.to_json())
     | "WriteDeadLetters" >> beam.io.WriteToText(
         FileSystems.join(output, "dead_letters", "dead_letters"), file_name_suffix=".ndjson"))
    if STATS in outputs:
        # One small document: written whole by the one element (WriteToText would shuffle it under a pickled key).
        outputs[STATS] | "WriteStats" >> beam.Map(_write_json_element, FileSystems.join(output, "stats.json"))


def _write_json_element(body: dict, path: str) -> str:
    write_json(path, body)
    return path


def run(argv: Optional[list[str]] = None) -> dict:
    """Runs the batch job; returns the summary it prints and writes."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    options = BatchOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    use_all_cores_locally(options, argv)
    started = time.monotonic()
    spec = load_spec(options.spec)
    split = split_from_options(spec, options)
    inputs = resolve_inputs(spec, options.input, query=options.input_query, bigquery=True)
    files = input_names(inputs, options)
    output = options.output.rstrip("/")
    clear_outputs(output, (*SPLITS, "dead_letters"), ("spec.json", "summary.json", "stats.json"))
    logging.info("spec %s (%s), %d input(s): %s", spec.name, spec.fingerprint[:12], len(files),
                 ", ".join(i.pattern if i.source_name is None else f"{i.source_name}={i.pattern}" for i in inputs))

    pipeline = beam.Pipeline(options=options)
    construct(pipeline, options, spec, split, inputs, output)
    with heartbeat(started, every_s=15, expected="the full flights data takes about three minutes on 2 cores"):
        result = pipeline.run()
        result.wait_until_finish()

    summary = summarize(counters(result), spec)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["spec"] = {"name": spec.name, "fingerprint": spec.fingerprint}
    summary["input"] = files
    summary["split"] = {"method": split.method,
                        **({"eval_start": split.eval_start.date().isoformat(),
                            "test_start": split.test_start.date().isoformat()} if split.method == "time" else
                           {"eval_fraction": split.eval_fraction, "test_fraction": split.test_fraction})}
    summary["outputs"] = {name: sorted(m.path for m in FileSystems.match(
        [FileSystems.join(output, name, "*")])[0].metadata_list) for name in (*SPLITS, "dead_letters")}
    write_json(FileSystems.join(output, "spec.json"), {
        "spec": spec.to_document(),
        "fingerprint": spec.fingerprint,
        "example_columns": [column._asdict() for column in example_columns(spec)],
        "split": summary["split"],
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    write_json(FileSystems.join(output, "summary.json"), summary)
    _print_summary(summary, output, with_stats=not options.no_stats)
    return summary


def _print_summary(summary: dict, output: str, with_stats: bool = True) -> None:
    examples = summary["examples"]
    lines = [
        f"batch job finished in {summary['seconds']} s",
        f"  records read        {summary['records_read']:>9,}   dead letters {summary['dead_letters']:,}",
        f"  events              {summary['requests'] + summary['observations']:>9,}   "
        f"({summary['requests']:,} requests, {summary['observations']:,} observations)",
        f"  examples            {sum(examples.values()):>9,}   "
        + ", ".join(f"{name} {count:,}" for name, count in examples.items()),
        f"  duplicates          {sum(summary['duplicates'].values()):>9,}   identical copies of an event, dropped "
        f"(conflicting copies are dead letters: {sum(summary['conflicts'].values()):,})",
        f"  unlabeled requests  {summary['unlabeled_requests']:>9,}   (no outcome, not written)",
        f"  late events         {summary['late_requests'] + summary['late_observations']:>9,}",
        f"  output              {output}/{{train,eval,test}}/ dead_letters/ spec.json summary.json"
        + (" stats.json" if with_stats else ""),
    ]
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append("  counts add up       yes" if not failed else f"  COUNTS DO NOT ADD UP: {failed}")
    print("\n".join(lines), flush=True)


def main() -> None:
    quiet_tensorflow()
    if {"-h", "--help"} & set(sys.argv[1:]):
        print_help("python -m beam_app.batch", __doc__, (CommonOptions, BatchOptions),
                   "Any Apache Beam pipeline option is accepted too: --runner (DirectRunner here, DataflowRunner "
               "with --project/--region/--temp_location/--setup_file ./setup.py), --direct_num_workers "
               "(default here: one per core), ...")
        return
    try:
        summary = run(sys.argv[1:])
    except (SpecError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if not all(summary["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
