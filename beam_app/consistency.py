"""The consistency job: what the streaming job served, recomputed by the batch
engine from the event history, feature by feature.

    served-features log (BigQuery table or NDJSON files, a time range)
      \\
       CoGroupByKey(event_id) -> compare every served column bit for bit -> per feature counts
      /                                  |
    history (the events archive table, or CSV/NDJSON files)
      -> DeduplicateEvents -> WindowedFeatures(spec) (the batch engine)
                                         v
    differences -> explained from the history where it can (transforms/skew.py:
    a job started without a warm start, an observation that arrived after the
    answer, conflicting copies) -> differences-*.ndjson, consistency.json

Per served column it counts: compared, equal, different, logged but not
recomputable (no such request in the history), recomputable but not logged
(a request of the range, in the --served_features_rate sample, without a
served row). Rows served under another spec fingerprint are counted and not
compared. Exits 1 when the share of compared requests with any difference is
above --max_mismatch_rate (default 0: our contract is exact).

    python -m beam_app.consistency --runner DirectRunner \\
        --served_features my-project:features.served_features \\
        --history my-project:features.events --start 2026-12-01T00:00:00Z --end 2026-12-02T00:00:00Z \\
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
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import SetupOptions

from beam_app.adapters import load_adapters
from beam_app.common.options import CommonOptions, configure_logging, print_help, quiet_tensorflow
from beam_app.bigquery.served_log import is_table, read_served_rows
from beam_app.bigquery.tables import event_fields, in_served_sample, served_columns
from transforms.deduplicate import DeduplicateEvents
from transforms.events import Event, InvalidRecord, rfc3339_to_time_us, time_us_to_rfc3339
from transforms.examples import row_values
from transforms.parse import DEAD_LETTERS, EventValidator, ParseEvents
from transforms.read_files import ReadRecords, matched_files
from transforms.skew import Arrived, column_groups, differing_columns, explain_group
from transforms.spec import FeatureSpec, SpecError, load_spec
from transforms.feature_layout import EventLayout, event_key, feature_groups
from transforms.windowed_features import WindowedFeatures

VERDICTS = ("compared", "equal", "different", "logged_not_recomputable", "recomputable_not_logged")
DIFFERENCES = "differences"
REFUSED = "refused"
SAMPLE_UNEXPLAINED = 100  # listed in consistency.json; differences-*.ndjson has them all


class ConsistencyOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--served_features", default=None,
            help="The served-features log: the streaming job's --served_features_table (project:dataset.table) or "
                 "NDJSON files of its rows (a path or glob, local or gs://). Required.")
        parser.add_argument(
            "--history", default=None,
            help="The event history to recompute from: the streaming job's --events_table (it also says when "
                 "each event arrived, which explains late observations), or CSV/NDJSON files as the batch job "
                 "reads them. Required.")
        parser.add_argument("--history_format", default="auto", choices=("auto", "csv", "json"),
                            help="How to read --history files; auto: .ndjson/.jsonl/.json are events, else CSV.")
        parser.add_argument("--start", default=None,
                            help="First request event time to check, RFC 3339 (default: the log's beginning).")
        parser.add_argument("--end", default=None,
                            help="Check requests before this event time, RFC 3339 (default: no end).")
        parser.add_argument(
            "--served_features_rate", type=float, default=1.0,
            help="The streaming job's --served_features_rate: which requests of the history must have a served "
                 "row (default 1.0).")
        parser.add_argument("--output", default="output/consistency",
                            help="Directory (local or gs://) for consistency.json and differences-*.ndjson "
                                 "(default output/consistency).")
        parser.add_argument(
            "--max_mismatch_rate", type=float, default=0.0,
            help="Exit 1 when the share of compared requests with any differing feature is above this "
                 "(default 0: any difference fails).")
        parser.add_argument("--bigquery_endpoint", default=None,
                            help="BigQuery API endpoint, e.g. http://127.0.0.1:9050 for the local emulator.")


def _time_us(text: Optional[str]) -> Optional[int]:
    return None if text is None else rfc3339_to_time_us(text)


class _EventsFromTable(beam.DoFn):
    """Events archive rows -> Arrived(validated Event, arrival): a row the spec refuses is counted and left out."""

    def __init__(self, spec: FeatureSpec):
        self._spec = spec
        self._names = tuple(event_fields(spec))

    def setup(self):
        self._validate = EventValidator(self._spec)

    def process(self, row: dict):
        fields = {name: row.get(name) for name in self._names if row.get(name) is not None}
        try:
            event = self._validate(Event(row["event_id"], row["role"], rfc3339_to_time_us(row["event_time"]), fields))
        except (InvalidRecord, KeyError) as err:
            logging.warning("history row %s refused: %s", row.get("event_id"), err)
            yield beam.pvalue.TaggedOutput(REFUSED, "history/refused")
            return
        yield Arrived(event, rfc3339_to_time_us(row["processing_time"]))


def read_history(pipeline, spec: FeatureSpec, options: ConsistencyOptions, start_us: Optional[int],
                 end_us: Optional[int]):
    """(PCollection[Arrived], PCollection of a counter key per history record
    the spec refuses): every copy of every event (the dedup is the engine's),
    with its arrival where the history knows it."""
    if is_table(options.history):
        since = None if start_us is None else time_us_to_rfc3339(start_us - spec.max_window_s * 1_000_000)
        until = None if end_us is None else time_us_to_rfc3339(end_us)
        endpoint = options.bigquery_endpoint
        rows = (pipeline
                | "HistoryTable" >> beam.Create([options.history])
                | "ReadHistory" >> beam.FlatMap(lambda table: read_served_rows(table, since, until, endpoint))
                | "SpreadHistory" >> beam.Reshuffle()
                | "HistoryEvents" >> beam.ParDo(_EventsFromTable(spec)).with_outputs(REFUSED, main="events"))
        return rows.events, rows[REFUSED]
    parsed = pipeline | "ReadHistory" >> ReadRecords(options.history, options.history_format) | (
        "ParseHistory" >> ParseEvents(spec, adapters=load_adapters(spec)))
    refused = parsed[DEAD_LETTERS] | "RefusedHistory" >> beam.Map(lambda _: "history/refused")
    return parsed["events"] | "UnknownArrival" >> beam.Map(lambda event: Arrived(event, None)), refused


class _TimeBounds(beam.CombineFn):
    """The earliest and latest served event time: the range an open --start/--end means."""

    def create_accumulator(self):
        return None

    def add_input(self, bounds, time_us):
        return (time_us, time_us) if bounds is None else (min(bounds[0], time_us), max(bounds[1], time_us))

    def merge_accumulators(self, accumulators):
        present = [b for b in accumulators if b is not None]
        return (min(b[0] for b in present), max(b[1] for b in present)) if present else None

    def extract_output(self, bounds):
        return bounds


class _Compare(beam.DoFn):
    """(event_id, {"served": [rows], "batch": [FeatureRow]}) -> counter keys
    (main) and, per served row that differs, a difference (tagged)."""

    def __init__(self, spec: FeatureSpec, start_us: Optional[int], end_us: Optional[int], rate: float):
        self._spec = spec
        self._range = (start_us, end_us)
        self._rate = rate
        self._columns = tuple(column.name for column in served_columns(spec))

    def _in_range(self, time_us: int, logged: Optional[tuple[int, int]]) -> bool:
        start, end = self._range
        if logged is None:
            return False  # nothing logged: an open range covers nothing
        return ((time_us >= start) if start is not None else (time_us >= logged[0])) and (
            (time_us < end) if end is not None else (time_us <= logged[1]))

    def process(self, joined, logged):
        event_id, sides = joined
        served, recomputed = list(sides["served"]), list(sides["batch"])
        if not served:
            row = recomputed[0]
            # Only requests the log should hold: in the range (open: the log's own first to last) and sampled.
            if self._in_range(row.event.time_us, logged) and in_served_sample(event_id, self._rate):
                yield "requests/recomputable_not_logged"
                for name in self._columns:
                    yield f"column/{name}/recomputable_not_logged"
            return
        yield "requests/logged"
        if len(served) > 1:
            yield "requests/logged_more_than_once"
        expected = row_values(self._spec, recomputed[0]) if recomputed else None
        any_difference = False
        for index, row in enumerate(sorted(served, key=lambda r: (r["processing_time"], r["model_version"]))):
            yield "rows/logged"
            if row["spec_fingerprint"] != self._spec.fingerprint:
                yield "rows/spec_mismatch"  # features of another spec: nothing to compare them with
                continue
            if expected is None:
                yield "rows/logged_not_recomputable"
                for name in self._columns:
                    yield f"column/{name}/logged_not_recomputable"
                continue
            yield "rows/compared"
            differing = differing_columns(row, expected, self._columns)
            for name in self._columns:
                yield f"column/{name}/compared"
                yield f"column/{name}/{'different' if name in differing else 'equal'}"
            if differing:
                any_difference = True
                yield beam.pvalue.TaggedOutput(DIFFERENCES, (f"{event_id}#{index}", {
                    "event_id": event_id, "event_time": row["event_time"], "model_version": row["model_version"],
                    "processing_time": row["processing_time"], "job_start_time": row["job_start_time"],
                    "request": recomputed[0].event, "served": row,
                    "columns": {name: {"served": row.get(name), "batch": expected.get(name)} for name in differing}}))
        if expected is not None:
            yield "requests/different" if any_difference else "requests/equal"


def _difference_keys(spec: FeatureSpec):
    """A difference -> ((key field, key value), (difference id, group index)) per differing feature group."""
    owner = column_groups(spec)
    groups = feature_groups(spec)
    layout = EventLayout.of(spec)

    def keys(keyed):
        difference_id, difference = keyed
        touched = {groups.index(owner[name]) for name in difference["columns"] if owner.get(name) is not None}
        for index in sorted(touched):
            group = groups[index]
            yield (group.name, event_key(layout, group, difference["request"])), (difference_id, index, difference)
    return keys


class _Explain(beam.DoFn):
    """((group name, key value), {"differences": [...], "observations": [Arrived]}) -> (difference id, (group, explanation))."""

    def __init__(self, spec: FeatureSpec):
        self._spec = spec

    def process(self, joined):
        _, sides = joined
        observations = list(sides["observations"])
        groups = feature_groups(self._spec)
        for difference_id, index, difference in sides["differences"]:
            explanation = explain_group(self._spec, groups[index], difference["request"], difference["served"],
                                        observations, rfc3339_to_time_us(difference["job_start_time"]))
            yield difference_id, (groups[index].name, explanation)


def _finish_difference(spec: FeatureSpec):
    owner = column_groups(spec)

    def finish(joined):
        difference_id, sides = joined
        (difference,) = sides["difference"]
        explained = dict(sides["explanations"])
        static = [name for name in difference["columns"] if owner.get(name) is None]
        groups = {owner[name].name for name in difference["columns"] if owner.get(name) is not None}
        explanations = {field: explained.get(field) for field in sorted(groups)}
        complete = not static and all(explanations.values())
        categories = sorted({part for e in explanations.values() if e for part in e.category.split("+")})
        return {
            "event_id": difference["event_id"], "event_time": difference["event_time"],
            "model_version": difference["model_version"], "processing_time": difference["processing_time"],
            "job_start_time": difference["job_start_time"], "columns": difference["columns"],
            "explained": complete, "categories": categories if complete else categories + ["unexplained"],
            "explanations": {field: (e.detail if e else None) for field, e in explanations.items()},
            **({"unexplained_static_columns": static} if static else {}),
        }
    return finish


def _difference_counters(record: dict):
    if record["explained"]:
        yield "differences/explained"
        for category in record["categories"]:
            yield f"differences/explained/{category}"
    else:
        yield "differences/unexplained"


def summarize(counts: dict[str, int], unexplained: list[dict], spec: FeatureSpec, options: dict) -> dict:
    """The consistency.json body from the counter keys' totals."""
    c = lambda key: counts.get(key, 0)  # noqa: E731
    columns = {name: {verdict: c(f"column/{name}/{verdict}") for verdict in VERDICTS}
               for name in (column.name for column in served_columns(spec))}
    compared = c("requests/equal") + c("requests/different")
    rate = c("requests/different") / compared if compared else 0.0
    categories = {key.split("/", 2)[2]: value for key, value in counts.items()
                  if key.startswith("differences/explained/")}
    return {
        "spec": {"name": spec.name, "fingerprint": spec.fingerprint},
        **options,
        "history_records_refused": c("history/refused"),
        "rows_logged": c("rows/logged"),
        "requests_logged": c("requests/logged"),
        "requests_logged_more_than_once": c("requests/logged_more_than_once"),
        "rows_spec_mismatch": c("rows/spec_mismatch"),
        "requests_compared": compared,
        "requests_equal": c("requests/equal"),
        "requests_different": c("requests/different"),
        "rows_logged_not_recomputable": c("rows/logged_not_recomputable"),
        "requests_recomputable_not_logged": c("requests/recomputable_not_logged"),
        "differences": c("differences/explained") + c("differences/unexplained"),
        "differences_explained": c("differences/explained"),
        "differences_unexplained": c("differences/unexplained"),
        "explained_by": dict(sorted(categories.items())),
        "mismatch_rate": rate,
        "passed": rate <= options["max_mismatch_rate"],
        "features": columns,
        "unexplained": sorted(unexplained, key=lambda d: d["event_id"])[:SAMPLE_UNEXPLAINED],
    }


def construct(pipeline: beam.Pipeline, options: ConsistencyOptions, spec: FeatureSpec) -> None:
    start_us, end_us = _time_us(options.start), _time_us(options.end)
    source, endpoint, start, end = options.served_features, options.bigquery_endpoint, options.start, options.end
    served = (pipeline
              | "ServedLog" >> beam.Create([source])
              | "ReadServed" >> beam.FlatMap(lambda log: read_served_rows(log, start, end, endpoint))
              | "SpreadServed" >> beam.Reshuffle()
              | "ServedById" >> beam.Map(lambda row: (row["event_id"], row)))
    bounds = (served | "ServedTimes" >> beam.MapTuple(lambda _, row: rfc3339_to_time_us(row["event_time"]))
              | "ServedRange" >> beam.CombineGlobally(_TimeBounds()))
    history, refused = read_history(pipeline, spec, options, start_us, end_us)
    unique = (history
              | "Events" >> beam.Map(lambda arrived: arrived.event)
              | "DeduplicateEvents" >> DeduplicateEvents(horizon_s=0))
    recomputed = (unique["events"]
                  | "WindowedFeatures" >> WindowedFeatures(spec)
                  | "BatchById" >> beam.Map(lambda row: (row.event.event_id, row)))
    compared = ({"served": served, "batch": recomputed} | "JoinById" >> beam.CoGroupByKey()
                | "Compare" >> beam.ParDo(_Compare(spec, start_us, end_us, options.served_features_rate),
                                          logged=beam.pvalue.AsSingleton(bounds))
                .with_outputs(DIFFERENCES, main="counters"))
    differences = compared[DIFFERENCES]

    # Only the observations of key values that have a difference travel on to be explained.
    by_key = differences | "ByKey" >> beam.FlatMap(_difference_keys(spec))
    keys = (by_key | "Keys" >> beam.Map(lambda item: item[0]) | "DistinctKeys" >> beam.Distinct()
            | "KeyFlags" >> beam.Map(lambda key: (key, True)))
    groups, layout = feature_groups(spec), EventLayout.of(spec)

    def observation_keys(arrived, wanted):
        keyed = ((group.name, event_key(layout, group, arrived.event)) for group in groups)
        return [(key, arrived) for key in keyed if key[1] is not None and key in wanted]

    observations = (
        history
        | "Observations" >> beam.Filter(lambda arrived: arrived.event.role != "request")
        | "ObservationKeys" >> beam.FlatMap(observation_keys, wanted=beam.pvalue.AsDict(keys)))
    explanations = ({"differences": by_key, "observations": observations} | "JoinByKey" >> beam.CoGroupByKey()
                    | "Explain" >> beam.ParDo(_Explain(spec)))
    records = ({"difference": differences, "explanations": explanations} | "JoinDifference" >> beam.CoGroupByKey()
               | "Finish" >> beam.Map(_finish_difference(spec)))

    counts = ((compared.counters, refused, records | "DifferenceCounters" >> beam.FlatMap(_difference_counters))
              | "AllCounters" >> beam.Flatten()
              | "Count" >> beam.combiners.Count.PerElement()
              | "ToDict" >> beam.combiners.ToDict())
    unexplained = (records | "Unexplained" >> beam.Filter(lambda record: not record["explained"])
                   | "Sample" >> beam.combiners.Top.Of(SAMPLE_UNEXPLAINED, key=lambda r: r["event_id"], reverse=True))
    settings = {"served_features": source, "history": options.history, "start": start, "end": end,
                "served_features_rate": options.served_features_rate,
                "max_mismatch_rate": options.max_mismatch_rate}
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


class UsageError(ValueError):
    """A flag is missing or wrong: the message says which."""


def _check_options(options: ConsistencyOptions) -> None:
    for flag in ("served_features", "history"):
        if not getattr(options, flag):
            raise UsageError(f"--{flag} is required (see --help)")
    if not is_table(options.history):
        matched_files(options.history)  # FileNotFoundError says which pattern
    for flag in ("start", "end"):
        try:
            _time_us(getattr(options, flag))
        except InvalidRecord:
            raise UsageError(f"--{flag}: expected an RFC 3339 time like 2026-12-01T00:00:00Z") from None
    if not 0 < options.served_features_rate <= 1 or options.max_mismatch_rate < 0:
        raise UsageError("--served_features_rate is above 0 and at most 1; --max_mismatch_rate is 0 or more")


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
    options = ConsistencyOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    _check_options(options)
    started = time.monotonic()
    spec = load_spec(options.spec)
    output = options.output.rstrip("/")
    _clear_previous(output)
    logging.info("consistency: %s against %s (spec %s %s)", options.served_features, options.history, spec.name,
                 spec.fingerprint[:12])
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
        f"different {summary['requests_different']:,} (mismatch rate {summary['mismatch_rate']:.4%})",
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
                                            f"NO: mismatch rate above --max_mismatch_rate "
                                            f"{summary['max_mismatch_rate']}"))
    print("\n".join(lines), flush=True)


def main() -> None:
    quiet_tensorflow()
    if {"-h", "--help"} & set(sys.argv[1:]):
        print_help("python -m beam_app.consistency", __doc__, (CommonOptions, ConsistencyOptions),
                   "Any Apache Beam pipeline option is accepted too: --runner (DirectRunner here, DataflowRunner "
                   "with --project/--region/--temp_location/--setup_file ./setup.py), ...")
        return
    try:
        summary = run(sys.argv[1:])
    except (UsageError, SpecError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if not summary["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
