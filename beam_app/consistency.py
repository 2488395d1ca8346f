"""The consistency job: what the streaming job served, recomputed by the batch
engine from the event history, feature by feature; and whether every request
of the history got a prediction.

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
compared.

With --predictions it also checks completeness (beam_app/monitoring/completeness.py):
    history requests + predictions -> CoGroupByKey(event_id) -> missing-*.ndjson
every request of the range without a prediction is listed with its event_id
and time. One older than --allowed_lateness_s before the range's end is
overdue: the job should have answered it (a crash on a runner that acks on
pull loses what it held).

Exits 1 when the fraction of compared requests with any difference is above
--max_mismatch_fraction (default 0: our contract is exact) or a request is
overdue, 2 on a usage error.

    python -m beam_app.consistency --runner DirectRunner \\
        --served_features my-project:features.served_features \\
        --predictions my-project:features.predictions \\
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
from beam_app.monitoring.completeness import (MISSING, SAMPLE_MISSING, CheckCompleteness, completeness_summary,
                                              sample_order)
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
                 "NDJSON files of its rows (a path or glob, local or gs://): its features are recomputed and "
                 "compared. This, --predictions or both.")
        parser.add_argument(
            "--predictions", default=None,
            help="The streaming job's --predictions_table (project:dataset.table) or NDJSON files of its rows: "
                 "every request of the history in the range must have one prediction; those without one are "
                 "listed in missing-*.ndjson with their event_id and time.")
        parser.add_argument(
            "--allowed_lateness_s", type=int, default=3600,
            help="The streaming job's --allowed_lateness_s (default 3600): a request without a prediction fails "
                 "the check when it is older than this before the end of the range (--end, or the history's "
                 "latest event); a later one may still be in flight and is only reported.")
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
    endpoint = options.bigquery_endpoint
    history, refused = read_history(pipeline, spec, options, start_us, end_us)
    counted, records = [refused], None
    if options.served_features:
        source = options.served_features
        served = (pipeline
                  | "ServedLog" >> beam.Create([source])
                  | "ReadServed" >> beam.FlatMap(lambda log: read_served_rows(log, start, end, endpoint))
                  | "SpreadServed" >> beam.Reshuffle()
                  | "ServedById" >> beam.Map(lambda row: (row["event_id"], row)))
        compared = {"served": served, "history": history} | "CompareWithBatch" >> CompareWithBatch(
            spec, start_us, end_us, options.served_features_fraction)
        records = compared[RECORDS]
        counted.append(compared[COUNTS])
    missing = None
    if options.predictions:
        source = options.predictions
        predictions = (pipeline
                       | "PredictionsTable" >> beam.Create([source])
                       | "ReadPredictions" >> beam.FlatMap(lambda table: read_served_rows(table, start, end, endpoint))
                       | "SpreadPredictions" >> beam.Reshuffle())
        checked = ({"history": history | "ArrivedEvents" >> beam.Map(lambda arrived: arrived.event),
                    "predictions": predictions}
                   | "CheckCompleteness" >> CheckCompleteness(start_us, end_us, options.allowed_lateness_s))
        missing = checked[MISSING]
        counted.append(checked["counts"])
    counts = (counted
              | "AllCounters" >> beam.Flatten()
              | "Count" >> beam.CombinePerKey(sum)
              | "ToDict" >> beam.combiners.ToDict())
    settings = {"served_features": options.served_features, "predictions": options.predictions,
                "input": options.input, "start": start, "end": end,
                "served_features_fraction": options.served_features_fraction,
                "max_mismatch_fraction": options.max_mismatch_fraction,
                "allowed_lateness_s": options.allowed_lateness_s}
    output = options.output.rstrip("/")
    (counts
     | "Summarize" >> beam.Map(lambda c, unexplained, missing: json.dumps(
         job_summary(c, unexplained, missing, spec, settings), indent=2),
         unexplained=beam.pvalue.AsSingleton(_sample(pipeline, records, "Unexplained", SAMPLE_UNEXPLAINED,
                                                     lambda record: not record["explained"])),
         missing=beam.pvalue.AsSingleton(_sample(pipeline, missing, "Missing", SAMPLE_MISSING, key=sample_order)))
     | "WriteSummary" >> beam.io.WriteToText(FileSystems.join(output, "consistency"), file_name_suffix=".json",
                                             shard_name_template=""))
    for name, found in (("differences", records), (MISSING, missing)):
        if found is not None:
            (found
             | f"{name.title()}ToJson" >> beam.Map(lambda record: json.dumps(record, sort_keys=True, default=str))
             | f"Write{name.title()}" >> beam.io.WriteToText(FileSystems.join(output, name),
                                                              file_name_suffix=".ndjson"))


def job_summary(counts: dict, unexplained: list, missing: list, spec: FeatureSpec, settings: dict) -> dict:
    """consistency.json: the served features' verdicts and, with --predictions, the completeness
    check's. It passes when both do: the mismatch fraction within the bound, and no overdue request
    without a prediction."""
    summary = summarize(counts, unexplained, spec, settings)
    failures = [] if summary["passed"] else [
        f"mismatch fraction above --max_mismatch_fraction {summary['max_mismatch_fraction']}"]
    if settings["predictions"]:
        complete = summary["completeness"] = completeness_summary(counts, missing, settings)
        if complete["without_prediction_overdue"]:
            failures.append(f"overdue requests without a prediction: {complete['without_prediction_overdue']:,}, "
                            f"older than --allowed_lateness_s {complete['allowed_lateness_s']} before the range's end")
    summary["failures"], summary["passed"] = failures, not failures
    return summary


def _sample(pipeline, records, name: str, size: int, keep=lambda record: True, key=lambda record: record["event_id"]):
    """A PCollection of one list: the first `size` of `records` that `keep`, by `key` (empty without records)."""
    if records is None:
        return pipeline | f"No{name}" >> beam.Create([[]])
    return (records | name >> beam.Filter(keep)
            | f"Sample{name}" >> beam.combiners.Top.Of(size, key=key, reverse=True))


def check_options(options: ConsistencyOptions, spec: FeatureSpec) -> None:
    """UsageError (SpecError, FileNotFoundError) for a command line that cannot run: a required
    flag missing, a fraction out of range, a bad time range, an input that matches nothing."""
    if not options.input:
        raise UsageError("--input is required (see --help)")
    if not (options.served_features or options.predictions):
        raise UsageError("give --served_features (are the served features what batch computes?), --predictions "
                         "(has every request a prediction?), or both")
    if options.allowed_lateness_s < 0:
        raise UsageError(f"--allowed_lateness_s is 0 or more: got {options.allowed_lateness_s}")
    if not 0 < options.served_features_fraction <= 1:
        raise UsageError(f"--served_features_fraction is above 0 and at most 1: got {options.served_features_fraction}")
    if options.max_mismatch_fraction < 0:
        raise UsageError(f"--max_mismatch_fraction is 0 or more: got {options.max_mismatch_fraction}")
    time_range_us(options.start, options.end)
    for flag in ("served_features", "predictions"):
        value = getattr(options, flag)
        if value and not is_table(value) and not FileSystems.match([value])[0].metadata_list:
            raise FileNotFoundError(f"--{flag} {value!r} matches no file")
    if history_table(options.input) is None:
        input_names(resolve_inputs(spec, options.input), options)  # FileNotFoundError says which pattern


def _clear_previous(output: str) -> None:
    stale = [m.path for match in FileSystems.match([FileSystems.join(output, "differences-*"),
                                                   FileSystems.join(output, f"{MISSING}-*"),
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
    logging.info("consistency: %s against %s (spec %s %s)",
                 " and ".join(filter(None, (options.served_features, options.predictions))), ", ".join(options.input),
                 spec.name, spec.fingerprint[:12])
    pipeline = beam.Pipeline(options=options)
    construct(pipeline, options, spec)
    pipeline.run().wait_until_finish()
    path = FileSystems.join(output, "consistency.json")
    with FileSystems.open(path) as summary_file:
        summary = json.loads(summary_file.read())
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["outputs"] = {"summary": path, "differences": FileSystems.join(output, "differences-*.ndjson"),
                          MISSING: FileSystems.join(output, f"{MISSING}-*.ndjson")}
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    lines = [f"consistency job finished in {summary['seconds']} s"]
    if summary["served_features"]:
        explained = ", ".join(f"{name} {n:,}" for name, n in summary["explained_by"].items())
        lines += [
            f"  served rows         {summary['rows_logged']:>9,}   ({summary['requests_logged']:,} requests; "
            f"{summary['requests_logged_more_than_once']:,} logged more than once; "
            f"{summary['rows_spec_mismatch']:,} of another spec, not compared)",
            f"  compared            {summary['requests_compared']:>9,}   equal {summary['requests_equal']:,}, "
            f"different {summary['requests_different']:,} (mismatch fraction {summary['mismatch_fraction']:.4%})",
            f"  differences         {summary['differences']:>9,}   explained {summary['differences_explained']:,}"
            + (f" ({explained})" if explained else "") + f", unexplained {summary['differences_unexplained']:,}",
            f"  not comparable      logged but not recomputable {summary['rows_logged_not_recomputable']:,}, "
            f"recomputable but not logged {summary['requests_recomputable_not_logged']:,}",
        ]
        lines += [f"  unexplained         {record['event_id']}: {', '.join(record['columns'])}"
                  for record in summary["unexplained"][:5]]
    complete = summary.get("completeness")
    if complete:
        lines += [
            f"  requests            {complete['requests']:>9,}   answered {complete['answered']:,} "
            f"({complete['answered_more_than_once']:,} more than once), without a prediction "
            f"{complete['without_prediction']:,} (overdue {complete['without_prediction_overdue']:,}); "
            f"predictions of requests not in the history {complete['predictions_without_request']:,}",
        ]
        lines += [f"  no prediction       {record['event_id']} at {record['event_time']}"
                  + (" (overdue)" if record["overdue"] else " (may still be in flight)")
                  for record in complete["missing"][:5]]
    lines.append(f"  history             {summary['history_records_refused']:,} records the spec refuses (left out)")
    outputs = summary["outputs"]
    lines.append(f"  output              {outputs['summary']}"
                 + (f", {outputs['differences']}" if summary["served_features"] else "")
                 + (f", {outputs['missing']}" if complete else ""))
    lines.append("  passed              " + ("yes" if summary["passed"] else "NO: " + "; ".join(summary["failures"])))
    if complete and complete["without_prediction_overdue"]:
        lines.append(f"  to repair           within the job's allowed lateness, publish them again: python -m "
                     f"beam_app.publish --topic TOPIC --input '{outputs['missing']}' --input_format json "
                     f"(docs/howto.md, \"What a crash costs\")")
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
