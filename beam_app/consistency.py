"""The consistency job: what the streaming job served, recomputed by the batch
engine from the event history, feature by feature.

    served-features log (BigQuery table or NDJSON files, a time range)
      \\
       CoGroupByKey(event_id) -> verdicts (beam_app/monitoring/verdicts.py): every served
      /                          column compared bit for bit -> per feature counts
    history (--input: the events archive table, or CSV/NDJSON files)
      -> DeduplicateEvents -> WindowedFeatures(spec) (the batch engine)
                                         v
    differences -> explained from the history where it can (transforms/skew.py:
    a job started without a warm start, an observation that arrived after the
    answer, conflicting copies) -> differences-*.ndjson, consistency.json

Per served column it counts: compared, equal, different, logged but not
recomputable (no such request in the history), recomputable but not logged
(a request of the range, in the --served_features_fraction sample, without a
served row). Rows served under another spec fingerprint are counted and not
compared. Exits 1 when the fraction of compared requests with any difference
is above --max_mismatch_fraction (default 0: our contract is exact), 2 on a
usage error.

    python -m beam_app.consistency --runner DirectRunner \\
        --served_features my-project:features.served_features \\
        --input bq:my-project.features.events --start 2026-12-01 --end 2026-12-02 \\
        --output output/consistency

The same code runs on Dataflow (--runner DataflowRunner ...): BigQuery in,
files (gs://) out. BigQuery is read by a DoFn through the BigQuery client (the
one reader the local emulator answers), the history through a query limited to
the range plus the longest window.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import SetupOptions

from beam_app.adapters import load_adapters
from beam_app.bigquery.read import is_bigquery_input, parse_input_table
from beam_app.bigquery.served_log import is_table, read_served_rows
from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError
from beam_app.common.inputs import add_format_argument, input_names, read_inputs, resolve_inputs
from beam_app.common.options import (CommonOptions, configure_logging, pipeline_options, print_help, quiet_tensorflow,
                                     wants_help)
from beam_app.common.times import add_time_range_arguments, time_flag_rfc3339, time_range_us
from beam_app.monitoring.recompute import (COUNTS, RECORDS, REFUSED, SAMPLE_UNEXPLAINED, CompareWithBatch,
                                           EventsFromTable, summarize)
from transforms import counters
from transforms.events import time_us_to_rfc3339
from transforms.parse import DEAD_LETTERS, ParseEvents
from transforms.skew import Arrived
from transforms.spec import FeatureSpec, SpecError, load_spec


class ConsistencyOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--served_features", default=None,
            help="The served-features log: the streaming job's --served_features (project:dataset.table) or "
                 "NDJSON files of its rows (a path or glob, local or gs://). Required.")
        parser.add_argument(
            "--input", default=None, action="append",
            help="The event history to recompute from: the streaming job's --events_table as "
                 "bq:PROJECT.DATASET.TABLE (or PROJECT:DATASET.TABLE; it also says when each event arrived, "
                 "which explains late observations), or files as the batch job reads them: a path or glob "
                 "(local or gs://) of NDJSON events or of CSV read by the adapter of the spec's first source, "
                 "SOURCE=PATH for another source; repeat for several files. Required.")
        add_format_argument(parser, "--input_format", "--input files")
        add_time_range_arguments(parser, "Check the served requests")
        parser.add_argument(
            "--served_features_fraction", type=float, default=1.0,
            help="The streaming job's --served_features_fraction (its sample, chosen by a hash of event_id): "
                 "which requests of the history must have a served row (default 1.0: all).")
        parser.add_argument("--output", default="output/consistency",
                            help="Directory (local or gs://) for consistency.json and differences-*.ndjson "
                                 "(default output/consistency).")
        parser.add_argument(
            "--max_mismatch_fraction", type=float, default=0.0,
            help="Exit 1 when the fraction of compared requests with any differing feature is above this "
                 "(default 0: any difference fails).")
        parser.add_argument("--bigquery_endpoint", default=None, metavar="URL",
                            help="BigQuery API endpoint, e.g. http://127.0.0.1:9050 for the local emulator.")


def history_table(values: Optional[Sequence[str]]) -> Optional[str]:
    """The BigQuery table --input names (bq:PROJECT.DATASET.TABLE, or PROJECT:DATASET.TABLE
    as --served_features takes it), as read_served_rows reads it; None for files (a name
    with dots and no colon, flights.2013.csv, is a file). UsageError when a table comes
    with other inputs: the archive is the whole history."""
    tables = [parse_input_table(value) if is_bigquery_input(value) else value
              for value in values or () if is_bigquery_input(value) or (":" in value and is_table(value))]
    if tables and len(values) > 1:
        raise UsageError("--input: a BigQuery table is the whole history; pass it alone")
    return tables[0] if tables else None


def read_history(pipeline, spec: FeatureSpec, options: ConsistencyOptions, start_us: Optional[int],
                 end_us: Optional[int]):
    """(PCollection[Arrived], PCollection of (counter key, 1) per history record
    the spec refuses): every copy of every event (the dedup is the engine's),
    with its arrival where the history knows it."""
    table = history_table(options.input)
    if table is not None:
        since = None if start_us is None else time_us_to_rfc3339(start_us - spec.max_window_s * 1_000_000)
        until = None if end_us is None else time_us_to_rfc3339(end_us)
        endpoint = options.bigquery_endpoint
        rows = (pipeline
                | "HistoryTable" >> beam.Create([table])
                | "ReadHistory" >> beam.FlatMap(lambda name: read_served_rows(name, since, until, endpoint))
                | "SpreadHistory" >> beam.Reshuffle()
                | "HistoryEvents" >> beam.ParDo(EventsFromTable(spec)).with_outputs(REFUSED, main="events"))
        return rows.events, rows[REFUSED]
    records = read_inputs(pipeline, resolve_inputs(spec, options.input), options)
    parsed = records | "ParseHistory" >> ParseEvents(spec, adapters=load_adapters(spec))
    refused = parsed[DEAD_LETTERS] | "RefusedHistory" >> beam.Map(lambda _: (counters.HISTORY_REFUSED.key, 1))
    return parsed["events"] | "UnknownArrival" >> beam.Map(lambda event: Arrived(event, None)), refused


def construct(pipeline: beam.Pipeline, options: ConsistencyOptions, spec: FeatureSpec) -> None:
    start_us, end_us = time_range_us(options.start, options.end)
    start, end = time_flag_rfc3339(options.start, "--start"), time_flag_rfc3339(options.end, "--end")
    source, endpoint = options.served_features, options.bigquery_endpoint
    served = (pipeline
              | "ServedLog" >> beam.Create([source])
              | "ReadServed" >> beam.FlatMap(lambda log: read_served_rows(log, start, end, endpoint))
              | "SpreadServed" >> beam.Reshuffle()
              | "ServedById" >> beam.Map(lambda row: (row["event_id"], row)))
    history, refused = read_history(pipeline, spec, options, start_us, end_us)
    compared = {"served": served, "history": history} | "CompareWithBatch" >> CompareWithBatch(
        spec, start_us, end_us, options.served_features_fraction)
    records = compared[RECORDS]
    counts = ((compared[COUNTS], refused)
              | "AllCounters" >> beam.Flatten()
              | "Count" >> beam.CombinePerKey(sum)
              | "ToDict" >> beam.combiners.ToDict())
    unexplained = (records | "Unexplained" >> beam.Filter(lambda record: not record["explained"])
                   | "Sample" >> beam.combiners.Top.Of(SAMPLE_UNEXPLAINED, key=lambda r: r["event_id"], reverse=True))
    settings = {"served_features": source, "input": options.input, "start": start, "end": end,
                "served_features_fraction": options.served_features_fraction,
                "max_mismatch_fraction": options.max_mismatch_fraction}
    output = options.output.rstrip("/")
    (counts
     | "Summarize" >> beam.Map(lambda c, sample: json.dumps(summarize(c, sample, spec, settings), indent=2),
                               sample=beam.pvalue.AsSingleton(unexplained))
     | "WriteSummary" >> beam.io.WriteToText(FileSystems.join(output, "consistency"), file_name_suffix=".json",
                                             shard_name_template=""))
    (records
     | "DifferencesToJson" >> beam.Map(lambda record: json.dumps(record, sort_keys=True, default=str))
     | "WriteDifferences" >> beam.io.WriteToText(FileSystems.join(output, "differences"),
                                                 file_name_suffix=".ndjson"))


def check_options(options: ConsistencyOptions, spec: FeatureSpec) -> None:
    """UsageError (SpecError, FileNotFoundError) for a command line that cannot run: a required
    flag missing, a fraction out of range, a bad time range, an input that matches nothing."""
    for flag in ("served_features", "input"):
        if not getattr(options, flag):
            raise UsageError(f"--{flag} is required (see --help)")
    if not 0 < options.served_features_fraction <= 1:
        raise UsageError(f"--served_features_fraction is above 0 and at most 1: got {options.served_features_fraction}")
    if options.max_mismatch_fraction < 0:
        raise UsageError(f"--max_mismatch_fraction is 0 or more: got {options.max_mismatch_fraction}")
    time_range_us(options.start, options.end)
    if not is_table(options.served_features) and not FileSystems.match([options.served_features])[0].metadata_list:
        raise FileNotFoundError(f"--served_features {options.served_features!r} matches no file")
    if history_table(options.input) is None:
        input_names(resolve_inputs(spec, options.input), options)  # FileNotFoundError says which pattern


def _clear_previous(output: str) -> None:
    stale = [m.path for match in FileSystems.match([FileSystems.join(output, "differences-*"),
                                                   FileSystems.join(output, "consistency.json")])
             for m in match.metadata_list]
    if stale:
        FileSystems.delete(stale)


def run(argv: Optional[list[str]] = None) -> dict:
    """Runs the consistency job; returns the summary it writes to consistency.json."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    options = pipeline_options(ConsistencyOptions, argv)
    options.view_as(SetupOptions).save_main_session = False
    started = time.monotonic()
    spec = load_spec(options.spec)
    check_options(options, spec)
    output = options.output.rstrip("/")
    _clear_previous(output)
    logging.info("consistency: %s against %s (spec %s %s)", options.served_features, ", ".join(options.input),
                 spec.name, spec.fingerprint[:12])
    pipeline = beam.Pipeline(options=options)
    construct(pipeline, options, spec)
    pipeline.run().wait_until_finish()
    path = FileSystems.join(output, "consistency.json")
    with FileSystems.open(path) as summary_file:
        summary = json.loads(summary_file.read())
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["outputs"] = {"summary": path, "differences": FileSystems.join(output, "differences-*.ndjson")}
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    explained = ", ".join(f"{name} {n:,}" for name, n in summary["explained_by"].items())
    lines = [
        f"consistency job finished in {summary['seconds']} s",
        f"  served rows         {summary['rows_logged']:>9,}   ({summary['requests_logged']:,} requests; "
        f"{summary['requests_logged_more_than_once']:,} logged more than once; "
        f"{summary['rows_spec_mismatch']:,} of another spec, not compared)",
        f"  compared            {summary['requests_compared']:>9,}   equal {summary['requests_equal']:,}, "
        f"different {summary['requests_different']:,} (mismatch fraction {summary['mismatch_fraction']:.4%})",
        f"  differences         {summary['differences']:>9,}   explained {summary['differences_explained']:,}"
        + (f" ({explained})" if explained else "") + f", unexplained {summary['differences_unexplained']:,}",
        f"  not comparable      logged but not recomputable {summary['rows_logged_not_recomputable']:,}, "
        f"recomputable but not logged {summary['requests_recomputable_not_logged']:,}",
        f"  history             {summary['history_records_refused']:,} records the spec refuses (left out)",
    ]
    for record in summary["unexplained"][:5]:
        lines.append(f"  unexplained         {record['event_id']}: {', '.join(record['columns'])}")
    lines.append(f"  output              {summary['outputs']['summary']}, {summary['outputs']['differences']}")
    lines.append("  passed              " + ("yes" if summary["passed"] else
                                            f"NO: mismatch fraction above --max_mismatch_fraction "
                                            f"{summary['max_mismatch_fraction']}"))
    print("\n".join(lines), flush=True)


PROG = "python -m beam_app.consistency"
OPTION_CLASSES = (CommonOptions, ConsistencyOptions)


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
    if not summary["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
    main()
