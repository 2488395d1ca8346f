"""Options shared by every entry point; each entry point subclasses these."""

from __future__ import annotations

import argparse
import logging
import os

from typing import NamedTuple, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from beam_app.bigquery.read import PREFIX, QUERY_INPUT, BigQueryInputError, is_bigquery_input, parse_input_table
from transforms.read_files import resolve_input
from transforms.spec import FeatureSpec, SpecError, shipped_specs


class CommonOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--spec", default="flights",
            help=f"Feature spec: a shipped spec name ({', '.join(shipped_specs())}; default flights) "
                 "or a path to a spec YAML/JSON file.")


def add_input_arguments(parser, what: str, bigquery: bool = False) -> None:
    """--input and --input_format, read the same way by every entry point that
    reads events; with `bigquery`, BigQuery inputs too (bq:TABLE, --input_query,
    the time filter and the endpoints), read by beam_app.batch.read_inputs."""
    tables = (" Or bq:PROJECT.DATASET.TABLE (bq:PROJECT:DATASET.TABLE too): a BigQuery table of events, the "
              "streaming job's --events_table or any table with event_id, role (or kind), event_time and the "
              "spec's fields.") if bigquery else ""
    parser.add_argument(
        "--input", default=None, action="append",
        help=f"{what}: a path or glob (local or gs://) of NDJSON events, or of CSV files read by the adapter "
             "of the spec's first source; SOURCE=PATH for another source of the spec (flights_weather: "
             f"weather=PATH).{tables} Repeat for several. Default: every source's embedded data set.")
    parser.add_argument(
        "--input_format", default="auto", choices=("auto", "csv", "json"),
        help="How to read --input; auto: .ndjson/.jsonl/.json are events, anything else CSV.")
    if not bigquery:
        return
    parser.add_argument(
        "--input_query", default=None, metavar="SQL",
        help="Instead of --input: a BigQuery standard SQL query whose rows are events (columns event_id, "
             "role or kind, event_time and the spec's fields), run in --project.")
    parser.add_argument(
        "--input_since", default=None, metavar="TIME",
        help="BigQuery inputs: only rows whose event_time (a TIMESTAMP column) is at or after this UTC date "
             "(2013-11-01) or RFC 3339 time.")
    parser.add_argument(
        "--input_until", default=None, metavar="TIME",
        help="BigQuery inputs: only rows with event_time before this UTC date or RFC 3339 time (excluded).")
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


def quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter (no GPU here, CPU features): errors only.
    Must run before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure_logging(verbose: bool = False) -> None:
    """Our progress at INFO; Beam's own chatter only when it matters."""
    # force: importing TensorFlow/Beam may already have configured the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    if not verbose:
        for noisy in ("apache_beam", "absl", "tensorflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for chatter in (
            # The DirectRunner first tries to fetch the Prism runner; offline that
            # fails harmlessly and it falls back, with a traceback we do not need.
            "apache_beam.runners.direct.direct_runner",
            # Option-parsing notes about flags meant for other option classes.
            "apache_beam.options.pipeline_options",
            # Worker processes' own start-up warnings, relayed as raw protos.
            "apache_beam.runners.portability.local_job_service",
        ):
            logging.getLogger(chatter).setLevel(logging.ERROR)


def print_help(prog: str, description: str, option_classes: tuple, epilog: str) -> None:
    """--help from the entry point's docstring and its option classes' flags
    (Beam's own parser would list every Beam option first)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for option_class in option_classes:
        option_class._add_argparse_args(parser)
    parser.print_help()
