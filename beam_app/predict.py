"""Batch scoring: history -> the features both jobs compute -> the SavedModel -> predictions.

    history (files like the batch job's --input, or a BigQuery table: --input bq:...)
      -> ParseEvents, DeduplicateEvents      the batch job's: same validation, same dead letters
      -> ScoringRange                         requests in [--start, --end), and the observations they can see
      -> WindowedFeatures(spec)               the bounded path of the batch job: point-in-time [t - W, t)
      -> EncodeExamples (no label, keyed)     the streaming job's encoder and batches
      -> RunInference (SavedModelHandler)     the streaming job's handler; a failed batch: dead letters
      -> prediction rows                      the predictions table's schema, source = "batch"
      -> --output DIR (NDJSON or Parquet files) or --predictions_table (BigQuery, streaming inserts)

Every request in the range gets exactly one prediction or one dead letter,
and the summary checks that the counts add up. What it is for: backfilling
the predictions table, evaluating a version on history, and comparing with
what the streaming job served (the same event gets the same features in both,
so the same prediction from the same version).

Score the embedded flights of December with the newest model:

    python -m beam_app.predict --runner DirectRunner --model output/model \\
        --start 2013-12-01 --output output/predictions

Score the streaming job's events archive into the predictions table:

    python -m beam_app.predict --runner DirectRunner --model output/model \\
        --input bq:my-project.features.events --predictions_table my-project:features.predictions \\
        --dead_letter_table my-project:features.dead_letters
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
import time
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import SetupOptions

from beam_app.adapters import load_adapters
from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError
from beam_app.common.inputs import add_input_arguments, input_names, read_inputs, resolve_inputs
from beam_app.common.runner import is_local_runner, use_all_cores_locally
from beam_app.common.times import add_time_range_arguments, time_range_us
from beam_app.common.job_report import clear_outputs, heartbeat, write_json
from beam_app.common.job_report import counters as job_counters
from beam_app.common.options import (CommonOptions, configure_logging, pipeline_options, print_help, quiet_tensorflow,
                                     wants_help)
from beam_app.bigquery.tables import PREDICTIONS_SCHEMA, failed_inference_letters
from beam_app.bigquery.write import job_tables, prepare_tables, write_outputs
from beam_app.serving.rows import CountDeadLetters, ToPredictionRows
from models.inference import ModelLocation, SavedModelHandler, load_checked_model, locate_model
from transforms import counters
from transforms.deduplicate import STAGE as DUPLICATE_STAGE
from transforms.deduplicate import DeduplicateEvents
from transforms.events import rfc3339_to_time_us, time_us_to_rfc3339
from transforms.examples import EncodeExamples
from transforms.parse import DEAD_LETTERS, ParseEvents
from transforms.spec import FeatureSpec, SpecError, load_spec
from transforms.time_range import TimeRange, read_bounds_us
from transforms.windowed_features import WindowedFeatures

REQUEST = "request"
FORMATS = ("ndjson", "parquet")


class PredictOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_input_arguments(parser, "History to score", bigquery=True)
        parser.add_argument(
            "--model", default=None,
            help="The trained model: the --model_dir of `python -m models.train` (the version LATEST names when "
                 "the job starts), a version directory in it, or a saved_model directory; local or gs://.")
        add_time_range_arguments(parser, "Score the requests")
        parser.add_argument(
            "--output", default=None,
            help="Directory for the predictions as files: predictions/predictions-*.{ndjson|parquet} and "
                 "dead_letters/*.ndjson, and summary.json; earlier outputs of this job in it are replaced.")
        parser.add_argument(
            "--output_format", default="ndjson", choices=FORMATS,
            help="With --output: one JSON object per line (default), or Parquet (timestamps as UTC microseconds).")
        parser.add_argument(
            "--predictions_table", default=None,
            help="Or a BigQuery table for the predictions (the streaming job's schema): "
                 "<project>:<dataset>.<table>. Needs --dead_letter_table.")
        parser.add_argument(
            "--dead_letter_table", default=None,
            help="With --predictions_table: the BigQuery table for dead letters (the streaming job's schema).")
        parser.add_argument(
            "--create_tables", action="store_true",
            help="With --predictions_table: create the dataset and tables if missing.")
        parser.add_argument(
            "--inference_batch_size", type=int, default=1024,
            help="Largest batch of examples per model call (default 1024).")


def build(records, spec: FeatureSpec, model_path: str, start_us: Optional[int] = None, end_us: Optional[int] = None,
          inference_batch_size: int = 1024, clock: Callable[[], float] = time.time, handler=None) -> dict:
    """PCollection[RawRecord] -> {"predictions": PCollection[predictions row dict],
    "dead_letters": PCollection[DeadLetter]} (parse, duplicate and inference
    stages, each counted). No I/O. handler: the ModelHandler (default: the
    streaming job's SavedModelHandler on model_path)."""
    parsed = records | "ParseEvents" >> ParseEvents(spec, adapters=load_adapters(spec))
    unique = parsed["events"] | "DeduplicateEvents" >> DeduplicateEvents(horizon_s=0)
    examples = (
        unique["events"]
        | "TimeRange" >> TimeRange(start_us, end_us, spec.max_window_s * 1_000_000)
        | "WindowedFeatures" >> WindowedFeatures(spec)
        | "EncodeExamples" >> EncodeExamples(spec, with_label=False, max_batch_size=inference_batch_size)
    )
    predicted, failed = examples | "RunInference" >> RunInference(
        handler or SavedModelHandler(model_path, spec)).with_exception_handling()
    failed_inferences = failed.failed_inferences | "InferenceDeadLetters" >> beam.FlatMapTuple(
        failed_inference_letters)
    return {
        "predictions": predicted | "ToPredictionRows" >> beam.ParDo(ToPredictionRows(spec, clock, "batch")),
        DEAD_LETTERS: ((parsed[DEAD_LETTERS], unique[DUPLICATE_STAGE], failed_inferences)
                       | "MergeDeadLetters" >> beam.Flatten()
                       | "CountDeadLetters" >> beam.ParDo(CountDeadLetters())),
    }


def parquet_schema():
    """The predictions table's columns as Parquet: timestamps in UTC microseconds."""
    import pyarrow as pa

    types = {"STRING": pa.string(), "FLOAT64": pa.float64(), "TIMESTAMP": pa.timestamp("us", tz="UTC")}
    return pa.schema([pa.field(f["name"], types[f["type"]], nullable=f["mode"] == "NULLABLE")
                      for f in PREDICTIONS_SCHEMA])


def parquet_row(row: dict) -> dict:
    """A predictions row (RFC 3339 strings) -> Parquet values (microseconds for the timestamps)."""
    times = {f["name"] for f in PREDICTIONS_SCHEMA if f["type"] == "TIMESTAMP"}
    return {name: rfc3339_to_time_us(value) if name in times else value for name, value in row.items()}


def write_files(outputs: dict, output: str, output_format: str) -> None:
    predictions = outputs["predictions"]
    path = FileSystems.join(output, "predictions", "predictions")
    if output_format == "parquet":
        (predictions
         | "ToParquetRows" >> beam.Map(parquet_row)
         | "WritePredictions" >> beam.io.WriteToParquet(path, parquet_schema(), file_name_suffix=".parquet"))
    else:
        (predictions
         | "PredictionsToJson" >> beam.Map(lambda row: json.dumps(row, sort_keys=False))
         | "WritePredictions" >> beam.io.WriteToText(path, file_name_suffix=".ndjson"))
    (outputs[DEAD_LETTERS]
     | "DeadLettersToJson" >> beam.Map(lambda dead: dead.to_json())
     | "WriteDeadLetters" >> beam.io.WriteToText(FileSystems.join(output, "dead_letters", "dead_letters"),
                                                 file_name_suffix=".ndjson"))


def _check_options(options: PredictOptions) -> None:
    if not options.model:
        raise UsageError("--model is required: the --model_dir of `python -m models.train`, or a version in it")
    if bool(options.output) == bool(options.predictions_table):
        raise UsageError("give exactly one of --output DIR (files) or --predictions_table P:D.T (BigQuery)")
    if options.predictions_table and not options.dead_letter_table:
        raise UsageError("--predictions_table needs --dead_letter_table P:D.T for what could not be scored")
    if options.predictions_table and options.predictions_table == options.dead_letter_table:
        raise UsageError("--predictions_table and --dead_letter_table need a table each")
    if options.inference_batch_size < 1:
        raise UsageError(f"--inference_batch_size must be 1 or more, got {options.inference_batch_size}")


def summarize(counts: dict[str, int]) -> dict:
    """The counts a user reads, and whether they add up (every request in range: a prediction or a dead letter).
    `counts`: the finished job's counters, "namespace/name" -> value (transforms/counters.py)."""
    c = lambda counter: counter.of(counts)  # noqa: E731
    dead = {stage: c(counters.dead_letters(stage)) for stage in ("parse", "duplicate", "inference")}
    duplicates = counters.duplicates("").key  # "duplicates/": every role's
    summary = {
        "records_read": c(counters.RECORDS_READ),
        "requests": c(counters.REQUESTS),
        "duplicates": sum(value for name, value in counts.items() if name.startswith(duplicates)),
        "requests_in_range": c(counters.REQUESTS_IN_RANGE),
        "requests_outside_range": c(counters.REQUESTS_OUTSIDE_RANGE),
        "feature_rows": c(counters.FEATURE_ROWS),
        "predictions": c(counters.PREDICTION_ROWS),
        "dead_letters": dead,
        "late_requests": c(counters.LATE_REQUESTS),
    }
    summary["checks"] = {
        "records_read == records parsed + parse dead letters":
            c(counters.RECORDS_READ) == c(counters.RECORDS_OK) + dead["parse"],
        "feature_rows == requests_in_range": c(counters.FEATURE_ROWS) == c(counters.REQUESTS_IN_RANGE),
        "requests_in_range == predictions + inference dead letters":
            c(counters.REQUESTS_IN_RANGE) == c(counters.PREDICTION_ROWS) + dead["inference"],
    }
    return summary


def run(argv: Optional[list[str]] = None, clock: Callable[[], float] = time.time) -> dict:
    """Scores the history; returns the summary it prints (and writes, with --output)."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    options = pipeline_options(PredictOptions, argv)
    options.view_as(SetupOptions).save_main_session = False
    _check_options(options)
    use_all_cores_locally(options, argv)
    started = time.monotonic()
    spec = load_spec(options.spec)
    start_us, end_us = time_range_us(options.start, options.end)
    # A missing file or table, or a model of another spec, fails here rather than in the workers.
    inputs = resolve_inputs(spec, options.input, query=options.input_query, bigquery=True)
    names = input_names(inputs, options)
    location: ModelLocation = locate_model(options.model)
    load_checked_model(location.saved_model, spec)
    logging.info("scoring with model %s (spec %s %s), requests in [%s, %s)", location.version, spec.name,
                 spec.fingerprint[:12], "start" if start_us is None else time_us_to_rfc3339(start_us),
                 "end" if end_us is None else time_us_to_rfc3339(end_us))

    pipeline = beam.Pipeline(options=options)
    since_us, until_us = read_bounds_us(start_us, end_us, spec.max_window_s * 1_000_000)
    outputs = build(read_inputs(pipeline, inputs, options, since_us, until_us), spec, location.saved_model,
                    start_us, end_us, options.inference_batch_size, clock)
    if options.output:
        output = options.output.rstrip("/")
        clear_outputs(output, ("predictions", "dead_letters"), ("summary.json",))
        write_files(outputs, output, options.output_format)
    else:
        _write_tables(outputs, options, spec, clock)
    with heartbeat(started, every_s=15, expected="the full flights data takes about four minutes on 2 cores"):
        result = pipeline.run()
        result.wait_until_finish()

    summary = summarize(job_counters(result))
    seconds = time.monotonic() - started
    summary.update(seconds=round(seconds, 1), examples_per_s=round(summary["predictions"] / seconds, 1),
                   model=location.saved_model, model_version=location.version,
                   spec={"name": spec.name, "fingerprint": spec.fingerprint},
                   input=names,
                   range={"start": None if start_us is None else time_us_to_rfc3339(start_us),
                          "end": None if end_us is None else time_us_to_rfc3339(end_us)})
    if options.output:
        summary["outputs"] = {name: sorted(m.path for m in FileSystems.match(
            [FileSystems.join(output, name, "*")])[0].metadata_list) for name in ("predictions", "dead_letters")}
        write_json(FileSystems.join(output, "summary.json"), summary)
    else:
        summary["outputs"] = {"predictions": options.predictions_table, "dead_letters": options.dead_letter_table}
    _print_summary(summary)
    return summary


def _write_tables(outputs: dict, options: PredictOptions, spec: FeatureSpec, clock) -> None:
    """The streaming job's writes (one WriteToBigQuery, refused rows -> dead letters), to these two tables.
    `build` counted the dead letters already: the writes count only the rows BigQuery refuses."""
    from beam_app.bigquery.client import EndpointBigQueryClient, parse_table_spec

    tables = job_tables(spec, predictions=options.predictions_table, dead_letters=options.dead_letter_table)
    prepare_tables(tables, options.bigquery_endpoint, options.create_tables)
    project = parse_table_spec(options.predictions_table)[0]
    test_client = EndpointBigQueryClient(project, options.bigquery_endpoint) if options.bigquery_endpoint else None
    write_outputs(outputs, tables, test_client, clock, insert_shards=1 if is_local_runner(options) else None,
                  count_dead_letters=False)


def _where(output) -> str:
    """A table, or the directory of a list of files and how many."""
    if isinstance(output, str):
        return output
    return f"{posixpath.dirname(output[0])}/ ({len(output)} files)" if output else "(none)"


def _print_summary(summary: dict) -> None:
    dead = summary["dead_letters"]
    lines = [
        f"batch scoring finished in {summary['seconds']} s with model {summary['model_version']} "
        f"({summary['examples_per_s']:,} predictions/s)",
        f"  records read        {summary['records_read']:>9,}   parse dead letters {dead['parse']:,}",
        f"  requests            {summary['requests']:>9,}   in range {summary['requests_in_range']:,}, "
        f"outside {summary['requests_outside_range']:,}, duplicates dropped {summary['duplicates']:,} "
        f"(conflicting copies: {dead['duplicate']:,} dead letters)",
        f"  predictions         {summary['predictions']:>9,}   inference dead letters {dead['inference']:,}",
        f"  output              predictions {_where(summary['outputs']['predictions'])}, "
        f"dead letters {_where(summary['outputs']['dead_letters'])}",
    ]
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append("  counts add up       yes" if not failed else f"  COUNTS DO NOT ADD UP: {failed}")
    print("\n".join(lines), flush=True)


PROG = "python -m beam_app.predict"
OPTION_CLASSES = (CommonOptions, PredictOptions)


def main() -> None:
    quiet_tensorflow()
    if wants_help(sys.argv[1:]):
        print_help(PROG, __doc__, OPTION_CLASSES)
        return
    from models.export import SpecMismatch  # imports TensorFlow: after quiet_tensorflow, and not for --help

    try:
        summary = run(sys.argv[1:])
    except (UsageError, SpecError, SpecMismatch, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if not all(summary["checks"].values()):
        sys.exit(EXIT_CHECK_FAILED)


if __name__ == "__main__":
    main()
