"""What the streaming job writes to BigQuery, and batch scoring with it: the
tables of a job (`job_tables`), their creation or check at start
(`prepare_tables`), and one streaming insert for every row (`write_outputs`).

    {"predictions", "served_features", "events": PCollection[row dict],
     "dead_letters": PCollection[DeadLetter]}
      -> ToDeadLetterRows (counted per stage)
      -> WriteRows: every row into the table `row_table` names (one WriteToBigQuery)
      -> rows BigQuery refused: dead letters (stage "bigquery") -> WriteRefusedRows, the dead-letter table
      -> dead letters BigQuery refused: the worker log and the dead_letters/unwritable counter

Tables are {name: (table spec, schema fields)}, names as in bigquery/tables.py.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy

from beam_app.bigquery.tables import (DEAD_LETTERS, DEAD_LETTERS_SCHEMA, EVENTS, PREDICTIONS, PREDICTIONS_SCHEMA,
                                      SERVED_FEATURES, dead_letter_row, events_schema, failed_row_letter, row_table,
                                      served_features_schema, table_schema)
from beam_app.common.errors import UsageError
from transforms import counters
from transforms.events import DeadLetter
from transforms.spec import FeatureSpec

Tables = dict[str, tuple[str, tuple]]


def job_tables(spec: FeatureSpec, *, predictions: str, dead_letters: str, served_features: Optional[str] = None,
               events: Optional[str] = None) -> Tables:
    """The tables a job writes: {name: (table spec, schema fields)}; the
    optional ones only when given. The served-features and events schemas
    come from the spec (SpecError for a spec they cannot hold)."""
    tables = {PREDICTIONS: (predictions, PREDICTIONS_SCHEMA), DEAD_LETTERS: (dead_letters, DEAD_LETTERS_SCHEMA)}
    if served_features:
        tables[SERVED_FEATURES] = (served_features, served_features_schema(spec))
    if events:
        tables[EVENTS] = (events, events_schema(spec))
    return tables


def prepare_tables(tables: Tables, endpoint: Optional[str], create: bool) -> None:
    """Creates the tables (`create`: --create_tables) or checks that they
    exist, so a typo fails at start rather than as endless insert errors
    (UsageError naming --create_tables)."""
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


class Destinations:
    """Which table a row goes to (`row_table`), and that table's schema
    (WriteToBigQuery's dynamic destinations: a plain object, so it pickles)."""

    def __init__(self, tables: Tables):
        from beam_app.bigquery.client import parse_table_spec

        self._tables = {name: table for name, (table, _) in tables.items()}
        self._schemas = {parse_table_spec(table): table_schema(schema) for table, schema in tables.values()}

    def table(self, row: dict) -> str:
        return self._tables[row_table(row)]

    def schema(self, destination) -> dict:
        from beam_app.bigquery.client import parse_table_spec

        return self._schemas[parse_table_spec(str(destination))]


class ToDeadLetterRows(beam.DoFn):
    """DeadLetter -> a dead-letter table row (`dead_letter_row`), stamped with
    the wall clock (`clock`, injectable), counted per stage unless `count` is
    False (a job that counted its dead letters before)."""

    def __init__(self, clock: Callable[[], float], count: bool = True):
        self._clock = clock
        self._count = count
        self._counters = {}

    def process(self, dead: DeadLetter):
        if self._count:
            if dead.stage not in self._counters:
                self._counters[dead.stage] = counters.dead_letters(dead.stage).metric()
            self._counters[dead.stage].inc()
        yield dead_letter_row(dead, int(self._clock() * 1e6))


class LogUnwritable(beam.DoFn):
    """(destination, row, errors) of dead letters the dead-letter table
    refused: the end of the line, so they go to the worker log in full, and
    a counter."""

    def __init__(self):
        self._unwritable = counters.UNWRITABLE.metric()

    def process(self, failed):
        self._unwritable.inc()
        logging.error("dead letter refused by BigQuery (%s): %s; errors: %s", *failed)


def insert_rows(rows, label: str, table, schema, test_client, insert_shards: Optional[int] = None
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


def write_outputs(outputs: dict, tables: Tables, test_client=None, clock: Callable[[], float] = time.time,
                  insert_shards: Optional[int] = None, count_dead_letters: bool = True) -> None:
    """Every row to its table (`job_tables`) through one WriteToBigQuery (each
    of its steps costs the DirectRunner per bundle, even an empty one); rows
    BigQuery refuses become dead letters, written by a second.
    outputs: {"predictions", and optionally "served_features" and "events": PCollection[row dict],
    "dead_letters": PCollection[DeadLetter]}.
    insert_shards: keys per table before the insertAll calls (None: Beam's 500).
    count_dead_letters: False where the job counted them already (batch scoring)."""
    destinations = Destinations(tables)
    dead_letter_table = tables[DEAD_LETTERS][0]
    dead_letter_rows = outputs[DEAD_LETTERS] | "ToDeadLetterRows" >> beam.ParDo(
        ToDeadLetterRows(clock, count=count_dead_letters))
    rows = [outputs[name] for name in (PREDICTIONS, SERVED_FEATURES, EVENTS) if name in outputs]
    refused = insert_rows((*rows, dead_letter_rows) | "AllRows" >> beam.Flatten(), "WriteRows",
                          destinations.table, destinations.schema, test_client, insert_shards)
    refused_predictions, refused_dead_letters = refused | "SplitRefused" >> beam.Partition(
        lambda failed, _: int(row_table(failed[1]) == DEAD_LETTERS), 2)
    refused_rows = (
        refused_predictions
        | "RefusedPredictions" >> beam.MapTuple(failed_row_letter)
        | "RefusedToDeadLetterRows" >> beam.ParDo(ToDeadLetterRows(clock))
    )
    unwritable = insert_rows(refused_rows, "WriteRefusedRows", dead_letter_table,
                             table_schema(DEAD_LETTERS_SCHEMA), test_client, insert_shards)
    (refused_dead_letters, unwritable) | "Unwritable" >> beam.Flatten() | "LogUnwritable" >> beam.ParDo(
        LogUnwritable())
