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
import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import SetupOptions

from beam_app.adapters import load_adapters
from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError
from beam_app.common.inputs import Input, add_input_arguments, input_names, read_inputs, resolve_inputs
from beam_app.common.job_report import clear_outputs, heartbeat, write_json
from beam_app.common.job_report import counters as job_counters
from beam_app.common.options import (CommonOptions, configure_logging, pipeline_options, print_help, quiet_tensorflow,
                                     wants_help)
from beam_app.common.runner import use_all_cores_locally
from beam_app.common.times import add_time_range_arguments, parse_time, time_range_us
from transforms import counters
from transforms.deduplicate import STAGE as DUPLICATE_STAGE
from transforms.deduplicate import DeduplicateEvents
from transforms.examples import EncodeRecordBatches, example_columns
from transforms.feature_stats import FeatureStatistics, statistics_document
from transforms.parse import DEAD_LETTERS, ParseEvents
from transforms.spec import SPLITS, FeatureSpec, SpecError, SplitSpec, load_spec, validate_split
from transforms.split import SplitRecordBatches
from transforms.tfrecord_files import DEFAULT_GZIP_LEVEL, WriteTFRecordBatches
from transforms.time_range import TimeRange, read_bounds_us
from transforms.windowed_features import WindowedFeatures


class BatchOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_input_arguments(parser, "History to read", bigquery=True)
        add_time_range_arguments(parser, "Write examples of the requests")
        parser.add_argument(
            "--output", default="./output",
            help="Directory for the TFRecords, dead letters, spec.json and summary.json (default: ./output). "
                 "Earlier outputs of this job in it are replaced.")
        parser.add_argument(
            "--split", default=None, choices=("time", "hash"),
            help="time: by request time at --eval_start/--test_start (UTC); hash: stable on event_id, "
                 "by --eval_fraction/--test_fraction. Default: the spec's split.")
        parser.add_argument("--eval_start", default=None, metavar="TIME",
                            help="Time split: where eval begins, a UTC date (2013-11-01) or RFC 3339 time.")
        parser.add_argument("--test_start", default=None, metavar="TIME",
                            help="Time split: where test begins (same forms).")
        parser.add_argument("--eval_fraction", type=float, default=None, help="Hash split: share of eval.")
        parser.add_argument("--test_fraction", type=float, default=None, help="Hash split: share of test.")
        parser.add_argument(
            "--gzip_level", type=int, default=DEFAULT_GZIP_LEVEL, choices=range(1, 10), metavar="1-9",
            help=f"gzip level of the TFRecords (default {DEFAULT_GZIP_LEVEL}, zlib's default): 1 compresses the "
                 "flights examples about 3x faster, into files about 40%% larger. tf.data reads any level.")
        parser.add_argument(
            "--no_stats", action="store_true", default=False,
            help="Do not compute the training statistics (stats.json); for measuring what they cost.")


STATS = "stats"


def build(records, spec: FeatureSpec, split: SplitSpec, with_stats: bool = True,
          start_us: Optional[int] = None, end_us: Optional[int] = None) -> dict:
    """PCollection[list[RawRecord]] -> {"train"|"eval"|"test": PCollection[list[bytes]]
    of serialized tf.Examples (a RecordBatch's per element), "dead_letters": PCollection[DeadLetter]} and, with
    stats, "stats": PCollection[dict], one element: the stats.json document,
    computed from the same RecordBatches the examples are encoded from. Examples
    of the requests in [start_us, end_us) (None: unbounded). No I/O."""
    parsed = records | "ParseEvents" >> ParseEvents(spec, adapters=load_adapters(spec), batched=True)
    unique = parsed["events"] | "DeduplicateEvents" >> DeduplicateEvents(horizon_s=0, batched=True)
    events = unique["events"]
    if start_us is not None or end_us is not None:
        events = events | "TimeRange" >> TimeRange(start_us, end_us, spec.max_window_s * 1_000_000, batched=True)
    batches = (
        events
        | "WindowedFeatures" >> WindowedFeatures(spec, batched=True)
        | "Split" >> SplitRecordBatches(spec, split)
    )
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
            changes[name] = parse_time(getattr(options, name), f"--{name}")
    for name in ("eval_fraction", "test_fraction"):
        if getattr(options, name) is not None:
            changes[name] = getattr(options, name)
    split = dataclasses.replace(spec.split, **changes)
    try:
        validate_split(split)
    except SpecError as err:
        raise UsageError(str(err)) from None
    return split


def summarize(counts: dict[str, int], spec: FeatureSpec) -> dict:
    """The counts a user reads, and whether they add up (nothing lost silently).
    `counts`: the finished job's counters, "namespace/name" -> value (transforms/counters.py)."""
    c = lambda counter: counter.of(counts)  # noqa: E731
    examples = {name: c(counters.split_examples(name)) for name in SPLITS}
    duplicates = {role: c(counters.duplicates(role)) for role in spec.roles}
    conflicts = {role: c(counters.conflicts(role)) for role in spec.roles}
    by_kind = {kind.name: c(counters.parsed(kind.name)) for kind in spec.kinds}
    records_read, feature_rows = c(counters.RECORDS_READ), c(counters.FEATURE_ROWS)
    summary = {
        "records_read": records_read,
        "dead_letters": c(counters.PARSE_DEAD_LETTERS) + sum(conflicts.values()),
        "duplicates": duplicates,
        "conflicts": conflicts,
        "requests": c(counters.REQUESTS),
        "observations": sum(by_kind.values()),
        **({"observations_by_kind": by_kind} if len(by_kind) > 1 else {}),
        "requests_outside_range": c(counters.REQUESTS_OUTSIDE_RANGE),
        "feature_rows": feature_rows,
        "unlabeled_requests": c(counters.UNLABELED_REQUESTS),
        "examples": examples,
        "late_requests": c(counters.LATE_REQUESTS),
        "late_observations": c(counters.LATE_OBSERVATIONS),
    }
    checks = {
        "records_read == records parsed + dead_letters":
            records_read == c(counters.RECORDS_OK) + c(counters.PARSE_DEAD_LETTERS),
        "feature_rows == requests - duplicates - conflicts - requests outside --start/--end":
            feature_rows == c(counters.REQUESTS) - duplicates["request"] - conflicts["request"]
            - c(counters.REQUESTS_OUTSIDE_RANGE),
        "feature_rows == examples + unlabeled_requests":
            feature_rows == sum(examples.values()) + c(counters.UNLABELED_REQUESTS),
        "examples encoded == examples split": c(counters.EXAMPLES_ENCODED) == sum(examples.values()),
    }
    summary["checks"] = checks
    return summary


def construct(pipeline: beam.Pipeline, options: BatchOptions, spec: FeatureSpec, split: SplitSpec,
              inputs: list[Input], output: str) -> None:
    """Every step of the job, as run() runs it (the offline Dataflow translation
    test builds it the same way): the read, `build` and the writes."""
    start_us, end_us = time_range_us(options.start, options.end)
    since_us, until_us = read_bounds_us(start_us, end_us, spec.max_window_s * 1_000_000)
    outputs = build(read_inputs(pipeline, inputs, options, since_us, until_us, batched=True), spec, split,
                    with_stats=not options.no_stats, start_us=start_us, end_us=end_us)
    for name in SPLITS:
        outputs[name] | f"Write{name.title()}" >> WriteTFRecordBatches(
            FileSystems.join(output, name, "examples"), gzip_level=options.gzip_level)
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
    options = pipeline_options(BatchOptions, argv)
    options.view_as(SetupOptions).save_main_session = False
    use_all_cores_locally(options, argv)
    started = time.monotonic()
    spec = load_spec(options.spec)
    split = split_from_options(spec, options)
    time_range_us(options.start, options.end)
    inputs = resolve_inputs(spec, options.input, query=options.input_query, bigquery=True)
    files = input_names(inputs, options)
    output = options.output.rstrip("/")
    clear_outputs(output, (*SPLITS, "dead_letters"), ("spec.json", "summary.json", "stats.json"))
    logging.info("spec %s (%s), %d input(s): %s", spec.name, spec.fingerprint[:12], len(files),
                 ", ".join(i.pattern if i.source_name is None else f"{i.source_name}={i.pattern}" for i in inputs))

    pipeline = beam.Pipeline(options=options)
    construct(pipeline, options, spec, split, inputs, output)
    with heartbeat(started, every_s=15, expected="the full flights data takes about a minute on 2 cores"):
        result = pipeline.run()
        result.wait_until_finish()

    summary = summarize(job_counters(result), spec)
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
    print_summary(summary, output, with_stats=not options.no_stats)
    return summary


def print_summary(summary: dict, output: str, with_stats: bool = True) -> None:
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


PROG = "python -m beam_app.batch"
OPTION_CLASSES = (CommonOptions, BatchOptions)


def main() -> None:
    quiet_tensorflow()
    if wants_help(sys.argv[1:]):
        print_help(PROG, __doc__, OPTION_CLASSES)
        return
    try:
        summary = run(sys.argv[1:])
    except (UsageError, SpecError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if not all(summary["checks"].values()):
        sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
    main()
