"""Where events come from: --input (files, or BigQuery tables and queries) and
--input_format, read the same way by every command that reads history."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions

from beam_app.bigquery.read import (PREFIX, QUERY_INPUT, BigQueryInputError, Endpoints, ReadBigQueryRecords,
                                    check_table, is_bigquery_input, parse_input_table)
from transforms.gather import InBatches
from transforms.read_files import ReadRecords, matched_files, resolve_input
from transforms.spec import FeatureSpec, SpecError


def add_format_argument(parser, flag: str, of: str) -> None:
    """The flag that says how the files of flag `of` are read (ReadRecords' formats)."""
    parser.add_argument(
        flag, default="auto", choices=("auto", "csv", "json"),
        help=f"How to read {of}; auto: .ndjson/.jsonl/.json are events, anything else CSV.")


def add_input_arguments(parser, what: str, bigquery: bool = False) -> None:
    """--input and --input_format, read the same way by every entry point that
    reads events; with `bigquery`, BigQuery inputs too (bq:TABLE, --input_query,
    and the endpoints), read by read_inputs."""
    tables = (" Or bq:PROJECT.DATASET.TABLE (bq:PROJECT:DATASET.TABLE too): a BigQuery table of events, the "
              "streaming job's --events_table or any table with event_id, role (or kind), event_time and the "
              "spec's fields.") if bigquery else ""
    parser.add_argument(
        "--input", default=None, action="append",
        help=f"{what}: a path or glob (local or gs://) of NDJSON events, or of CSV files read by the adapter "
             "of the spec's first source; SOURCE=PATH for another source of the spec (flights_weather: "
             f"weather=PATH).{tables} Repeat for several. Default: every source's embedded data set.")
    add_format_argument(parser, "--input_format", "--input")
    if not bigquery:
        return
    parser.add_argument(
        "--input_query", default=None, metavar="SQL",
        help="Instead of --input: a BigQuery standard SQL query whose rows are events (columns event_id, "
             "role or kind, event_time and the spec's fields), run in --project.")
    parser.add_argument(
        "--bigquery_endpoint", default=None, metavar="URL",
        help="BigQuery REST API of another BigQuery than Google's, e.g. http://127.0.0.1:9050 for the local "
             "emulator, reached without credentials; needs --bigquery_grpc_endpoint. Default: Google's.")
    parser.add_argument(
        "--bigquery_grpc_endpoint", default=None, metavar="HOST:PORT",
        help="Its BigQuery Storage Read API (gRPC, plaintext), e.g. 127.0.0.1:9051. Default: Google's.")


class Input(NamedTuple):
    """A path or glob to read, and the spec's source whose CSV adapter reads it (None: the first);
    or a BigQuery table (bq:PROJECT.DATASET.TABLE) or query (bq:query) of events."""

    pattern: str
    source_name: Optional[str] = None


def resolve_inputs(spec: FeatureSpec, given: Optional[Sequence[str]], query: Optional[str] = None,
                   bigquery: bool = False) -> list[Input]:
    """The --input values (or, none given, every source's default input) as
    Inputs, with package: paths resolved; raises SpecError saying what to pass.
    With `bigquery`, a bq: value is an Input whose pattern is bq:PROJECT.DATASET.TABLE,
    and `query` (--input_query) the one Input bq:query."""
    if query is not None:
        if not bigquery:
            raise SpecError("--input_query: this entry point reads files only")
        if given:
            raise SpecError("pass --input or --input_query, not both")
        return [Input(QUERY_INPUT, None)]
    sources = {source.name: source for source in spec.sources}
    if not given:
        inputs = [Input(resolve_input(s.default_input), s.name) for s in spec.sources if s.default_input]
        if not inputs:
            raise SpecError(f"spec {spec.name!r} has no default input: pass --input")
        return inputs
    inputs = []
    for value in given:
        name, separator, path = value.partition("=")
        if is_bigquery_input(value):
            if not bigquery:
                raise SpecError(f"--input {value!r}: this entry point reads files only; "
                                "python -m beam_app.batch reads BigQuery tables")
            try:
                inputs.append(Input(PREFIX + parse_input_table(value), None))
            except BigQueryInputError as err:
                raise SpecError(str(err)) from None
        elif separator and name in sources:
            inputs.append(Input(resolve_input(path), name))
        elif separator and "/" not in name and "." not in name:
            raise SpecError(f"--input {value!r}: {name!r} is not a source of spec {spec.name!r}; "
                            f"have {sorted(sources)}")
        else:
            inputs.append(Input(resolve_input(value), None))
    return inputs


def bigquery_endpoints(options) -> Optional[Endpoints]:
    """--bigquery_endpoint and --bigquery_grpc_endpoint, both or neither (Google's)."""
    rest, grpc = getattr(options, "bigquery_endpoint", None), getattr(options, "bigquery_grpc_endpoint", None)
    if (rest is None) != (grpc is None):
        raise SpecError("BigQuery inputs at another endpoint need both --bigquery_endpoint (REST) and "
                        "--bigquery_grpc_endpoint (the Storage Read API): the read uses both")
    return Endpoints(rest, grpc) if rest is not None else None


def read_inputs(pipeline: beam.Pipeline, inputs: list[Input], options, since_us: Optional[int] = None,
                until_us: Optional[int] = None, batched: bool = False):
    """Every input's RawRecords, in one PCollection: files through ReadRecords,
    BigQuery tables and --input_query through ReadBigQueryRecords, which read
    only the rows with event_time in [since, until) (files are read whole: the
    job's TimeRange step keeps what it needs). `options`: any options object
    with add_input_arguments' flags (bigquery=True for BigQuery inputs).
    batched: PCollection[list[RawRecord]] instead, a few thousand records per element."""
    query = getattr(options, "input_query", None)
    tables = [i for i in inputs if is_bigquery_input(i.pattern)]
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
        return ReadRecords(i.pattern, options.input_format, i.source_name, batched=batched)

    def read_as_asked(index: Optional[int], i: Input):
        records = pipeline | label(index, i) >> read(i)
        if batched and is_bigquery_input(i.pattern):  # files come in chunks already
            return records | f"{label(index, i)}Batches" >> InBatches()
        return records

    def label(index: Optional[int], i: Input) -> str:
        if is_bigquery_input(i.pattern):
            return "ReadBigQuery" if index is None else f"ReadBigQuery_{index}"
        return "ReadRecords" if index is None else f"ReadRecords_{index}_{i.source_name or 'events'}"

    if len(inputs) == 1:
        return read_as_asked(None, inputs[0])
    return ([read_as_asked(index, i) for index, i in enumerate(inputs)]
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


