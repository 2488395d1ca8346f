"""Events read from a BigQuery table or query, as RawRecords the parser takes.

A row becomes the flat JSON line of an NDJSON event (`row_to_json_line`):
TIMESTAMP columns (datetimes) as RFC 3339, NULL as a missing field, a `kind`
column as the role when the table has no `role`. `ParseEvents` then validates
it exactly as a line of an events file, so a bad row is a dead letter with a
reason, like a bad line. Columns the spec does not name (the events archive's
processing_time) stay in the line, for the dead letter, and the parser drops
them.

    PBegin -> ReadBigQueryRecords -> PCollection[RawRecord] (kind "json",
    source "bq:PROJECT.DATASET.TABLE:EVENT_ID" or "bq:query:EVENT_ID")

The read is Beam's BigQuery Storage Read API source (`ReadFromBigQuery`,
method DIRECT_READ: a read session, its streams, Avro decoding). Beam gives it
no endpoint argument: it builds `BigQueryReadClient()` and the apitools
`BigqueryV2` client itself, for Google's endpoints with the default
credentials. The Storage client's only environment variables
(GOOGLE_API_USE_CLIENT_CERTIFICATE, GOOGLE_API_USE_MTLS_ENDPOINT,
GOOGLE_CLOUD_UNIVERSE_DOMAIN) can at most make its host
bigquerystorage.<domain>:443, over TLS with credentials: never a plaintext
127.0.0.1:PORT; apitools' BigqueryV2 URL has no variable. So with an endpoint (the local
emulator, see beam_app.local.stack) the source is `_EndpointStorageSource`, a
subclass of Beam's own source that builds those two clients for the endpoint,
without credentials, over a plaintext gRPC channel. Beam builds them inside
`split` and `read_avro`, so those two are restated with the endpoint's
clients (the same read session request, one source per stream); the query
job into a temporary dataset, the table size and the Avro decoding are
Beam's own methods and classes, and the temporary dataset is dropped by its
label after the read, as Beam's clean-up step does for Google's. Without an
endpoint it is Beam's `ReadFromBigQuery` itself, unchanged: what runs on
Dataflow.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from typing import Any, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.gcp import bigquery_tools
from apache_beam.io.gcp.bigquery import (ReadFromBigQuery, _CustomBigQueryStorageSource,
                                         _CustomBigQueryStorageStreamSource, _ReadReadRowsResponsesWithFastAvro)
from apache_beam.io.iobase import SourceBundle
from apache_beam.metrics.metric import Lineage

from transforms import counters
from transforms.events import ENVELOPE, RawRecord, time_us_to_rfc3339
from transforms.spec import SpecError

PREFIX = "bq:"
QUERY_INPUT = "bq:query"  # the Input of --input_query (no table: a query is not a valid table spec)


class BigQueryInputError(SpecError):
    """A BigQuery input that cannot be read; the message says what to pass or do
    (a SpecError: the entry points print it as the error it is, without a traceback)."""


def is_bigquery_input(value: str) -> bool:
    return value.startswith(PREFIX)


def parse_input_table(value: str) -> str:
    """'bq:PROJECT.DATASET.TABLE' or 'bq:PROJECT:DATASET.TABLE' -> 'PROJECT.DATASET.TABLE'."""
    spec = value[len(PREFIX):] if is_bigquery_input(value) else value
    parts = spec.replace(":", ".", 1).split(".")
    if len(parts) != 3 or not all(part.strip() for part in parts):
        raise BigQueryInputError(f"--input {value!r}: expected bq:PROJECT.DATASET.TABLE (or bq:PROJECT:DATASET.TABLE)")
    return ".".join(parts)


def _json_value(value: Any) -> Any:
    """A BigQuery value as Beam's Avro decoding gives it -> its JSON form in an events line."""
    if isinstance(value, dt.datetime):
        # TIMESTAMP columns come back aware (UTC); a DATETIME has no zone and stays without one, so that
        # the parser says an event_time needs an offset instead of guessing one.
        # isoformat, not strftime: BigQuery's years 1-999 keep their four digits.
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z") if value.tzinfo else \
            value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):  # NUMERIC: the parser's numbers are int or float
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()  # as BigQuery's own JSON writes BYTES
    if isinstance(value, Mapping):
        return {key: _json_value(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value


_AS_IS = frozenset({str, int, float, bool})  # most values: written without a call (the read's hot path)


def row_to_json_line(row: Mapping[str, Any]) -> str:
    """A table row -> the flat JSON line of an NDJSON event: NULL is a missing
    field, `kind` is the role where the table has no `role` column, the
    envelope first. Pure; never raises on a row BigQuery can hold (non-finite
    floats are written as Python's json writes them, NaN, which its reader
    takes back and the parser refuses with the field's name)."""
    role = "role" if "role" in row or "kind" not in row else "kind"
    body = {}
    for key in ENVELOPE:
        value = row.get(role if key == "role" else key)
        if value is not None:
            body[key] = value if type(value) in _AS_IS else _json_value(value)
    for key, value in row.items():
        if value is not None and key not in body and key != role:
            body[key] = value if type(value) in _AS_IS else _json_value(value)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def row_to_record(row: Mapping[str, Any], label: str) -> RawRecord:
    """A table row -> a RawRecord of kind json; `label` names the table (bq:P.D.T) or bq:query."""
    event_id = row.get("event_id")
    where = event_id if isinstance(event_id, str) and event_id else "(no event_id)"
    return RawRecord(f"{label}:{where}", row_to_json_line(row), "json")


def _timestamp_literal(time_us: int) -> str:
    seconds, micros = divmod(time_us, 1_000_000)
    moment = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds, microseconds=micros)
    return f"TIMESTAMP '{moment.strftime('%Y-%m-%d %H:%M:%S.%f')}+00:00'"


def time_restriction(since_us: Optional[int], until_us: Optional[int]) -> Optional[str]:
    """The half-open [since, until) on event_time as a BigQuery condition (a
    Storage API row_restriction, or a WHERE clause); None when unbounded."""
    if since_us is not None and until_us is not None and since_us >= until_us:
        raise BigQueryInputError(f"the rows to read start at {time_us_to_rfc3339(since_us)}, after their end "
                                 f"({time_us_to_rfc3339(until_us)}): --end must be after --start")
    conditions = ([f"event_time >= {_timestamp_literal(since_us)}"] if since_us is not None else []) + (
        [f"event_time < {_timestamp_literal(until_us)}"] if until_us is not None else [])
    return " AND ".join(conditions) or None


class Endpoints(NamedTuple):
    """A BigQuery that is not Google's (the local emulator): its REST API URL
    (http://127.0.0.1:9050) and its Storage API host:port, both reached
    without credentials, the gRPC channel in plaintext. Picklable: the
    clients are built where they are used."""

    rest: str
    grpc: str

    def apitools(self) -> Any:
        """Beam's own apitools BigqueryV2 client: table metadata and query jobs."""
        from apache_beam.io.gcp.internal.clients.bigquery import BigqueryV2

        return BigqueryV2(url=f"{self.rest.rstrip('/')}/bigquery/v2/", credentials=None, get_credentials=False,
                          response_encoding="utf8")

    def wrapper(self, temp_table_ref: Any = None) -> bigquery_tools.BigQueryWrapper:
        return bigquery_tools.BigQueryWrapper(client=self.apitools(), temp_table_ref=temp_table_ref)

    def read_client(self) -> Any:
        """The Storage Read API client Beam would build, for this endpoint."""
        import grpc
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery_storage_v1
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

        # Unlimited message sizes, as the transport sets on the channels it makes itself: with gRPC's
        # default 4 MiB, a ReadRows response of the emulator's (~5 MB for 54k flights events) fails the read.
        channel = grpc.insecure_channel(self.grpc, options=[("grpc.max_send_message_length", -1),
                                                            ("grpc.max_receive_message_length", -1)])
        transport = BigQueryReadGrpcTransport(channel=channel, credentials=AnonymousCredentials())
        return bigquery_storage_v1.BigQueryReadClient(transport=transport)


class _EndpointStreamSource(_CustomBigQueryStorageStreamSource):
    """One stream of a read session, read from `endpoints` (Beam's builds its client for Google's)."""

    def __init__(self, endpoints: Endpoints, read_stream_name: str, timeout: Optional[float] = None):
        super().__init__(read_stream_name, use_native_datetime=False, timeout=timeout)
        self._endpoints = endpoints

    def split(self, desired_bundle_size, start_position=None, stop_position=None):
        # Beam's returns a copy of its own class, which would read from Google.
        return SourceBundle(weight=1.0, source=self, start_position=None, stop_position=None)

    def read_avro(self):
        # Beam's read_avro with the endpoint's client; the decoding is Beam's.
        read_rows_kwargs = {"retry_delay_callback": self.retry_delay_callback}
        if self.timeout is not None:
            read_rows_kwargs["timeout"] = self.timeout
        responses = iter(self._endpoints.read_client().read_rows(self.read_stream_name, **read_rows_kwargs))
        first = next(responses, None)
        if first is None:
            return iter([])
        return iter(_ReadReadRowsResponsesWithFastAvro(responses, first))


class _EndpointStorageSource(_CustomBigQueryStorageSource):
    """Beam's DIRECT_READ source (Avro) with its clients built for `endpoints`:
    `split` is Beam's, but for where the two clients come from."""

    def __init__(self, endpoints: Endpoints, **kwargs):
        super().__init__(method=ReadFromBigQuery.Method.DIRECT_READ, use_native_datetime=False, **kwargs)
        self._endpoints = endpoints

    def estimate_size(self):
        if self.table_reference is None:
            return None  # a query: Beam's own estimate is best effort too
        return self._get_table_size(self._endpoints.wrapper(), self.table_reference)

    def split(self, desired_bundle_size, start_position=None, stop_position=None):
        if self.split_result is None:
            from google.cloud import bigquery_storage_v1 as bq_storage

            bq = self._endpoints.wrapper(self.temp_table)
            if self.query is not None:
                self._setup_temporary_dataset(bq)
                self.table_reference = self._execute_query(bq)
            if not self.table_reference.projectId:
                self.table_reference.projectId = self._get_project()
            Lineage.sources().add("bigquery", self.table_reference.projectId, self.table_reference.datasetId,
                                  self.table_reference.tableId)
            requested = bq_storage.types.ReadSession()
            requested.table = (f"projects/{self.table_reference.projectId}/datasets/"
                               f"{self.table_reference.datasetId}/tables/{self.table_reference.tableId}")
            requested.data_format = bq_storage.types.DataFormat.AVRO
            if self.selected_fields is not None:
                requested.read_options.selected_fields = self.selected_fields
            if self.row_restriction is not None:
                requested.read_options.row_restriction = self.row_restriction
            stream_count = self.MIN_SPLIT_COUNT
            if desired_bundle_size > 0:
                table_size = self._get_table_size(bq, self.table_reference) or 0
                stream_count = max(min(int(table_size / desired_bundle_size), self.MAX_SPLIT_COUNT),
                                   self.MIN_SPLIT_COUNT)
            session = self._endpoints.read_client().create_read_session(
                parent=f"projects/{self.table_reference.projectId}", read_session=requested,
                max_stream_count=stream_count)
            self.split_result = [_EndpointStreamSource(self._endpoints, stream.name, self.timeout)
                                 for stream in session.streams]
        for source in self.split_result:
            yield SourceBundle(weight=1.0, source=source, start_position=None, stop_position=None)


class _DropTemporaryDatasets(beam.DoFn):
    """After the read (its side input), the datasets a query's results went to, by their label.
    Beam's own clean-up step talks to Google's endpoint only."""

    def __init__(self, endpoints: Endpoints, project: str, labels: dict[str, str]):
        self._endpoints, self._project, self._labels = endpoints, project, labels

    def process(self, unused_element, unused_rows_read):
        self._endpoints.wrapper()._clean_up_beam_labelled_temporary_datasets(self._project, labels=self._labels)
        yield from ()


class ReadBigQueryRecords(beam.PTransform):
    """PBegin -> PCollection[RawRecord]: the rows of `table` ('PROJECT.DATASET.TABLE')
    or of `query` (standard SQL), optionally only those with event_time in
    [since_us, until_us), as events lines. A table read pushes the time filter
    to the Storage API (row_restriction); a query is wrapped in it.

    endpoints: a BigQuery other than Google's (None: Google's, through Beam's
    ReadFromBigQuery as is). project: the project a query job runs in (the
    pipeline's --project when None)."""

    def __init__(self, table: Optional[str] = None, query: Optional[str] = None, since_us: Optional[int] = None,
                 until_us: Optional[int] = None, endpoints: Optional[Endpoints] = None,
                 project: Optional[str] = None):
        super().__init__()
        if (table is None) == (query is None):
            raise BigQueryInputError("read a BigQuery table or a query: one of the two")
        self._table = parse_input_table(table) if table is not None else None
        self._query = query
        self._restriction = time_restriction(since_us, until_us)
        self._endpoints, self._project = endpoints, project

    @property
    def label_prefix(self) -> str:
        return f"{PREFIX}{self._table}" if self._table else QUERY_INPUT

    def _read_arguments(self) -> dict[str, Any]:
        if self._table is not None:
            project, dataset, table = self._table.split(".")
            return {"table": f"{project}:{dataset}.{table}", "row_restriction": self._restriction}
        query = self._query if self._restriction is None else \
            f"SELECT * FROM ({self._query}) WHERE {self._restriction}"
        return {"query": query, "use_standard_sql": True}

    def expand(self, pbegin):
        arguments = self._read_arguments()
        if self._query is not None and self._project is None:
            raise BigQueryInputError("--input_query needs --project: the project its query job runs in")
        if self._endpoints is None:
            rows = pbegin | "ReadFromBigQuery" >> ReadFromBigQuery(method=ReadFromBigQuery.Method.DIRECT_READ,
                                                                   project=self._project, **arguments)
        else:
            labels = {"type": f"bq_direct_read_{uuid.uuid4().hex[:10]}"}
            project = self._project or self._table.split(".")[0]
            rows = pbegin | "ReadFromBigQuery" >> beam.io.Read(_EndpointStorageSource(
                self._endpoints, project=project, pipeline_options=pbegin.pipeline.options,
                bigquery_dataset_labels=labels, **arguments))
            if self._query is not None:
                read = rows | "RowsRead" >> beam.combiners.Count.Globally()
                _ = (pbegin | "AfterRead" >> beam.Create([None])
                     | "DropTemporaryDatasets" >> beam.ParDo(_DropTemporaryDatasets(self._endpoints, project, labels),
                                                              beam.pvalue.AsSingleton(read)))
        return rows | "RowsToRecords" >> beam.ParDo(_RowsToRecords(self.label_prefix))


class _RowsToRecords(beam.DoFn):
    def __init__(self, label: str):
        self._label = label
        self._rows = counters.BIGQUERY_ROWS_READ.metric()

    def process(self, row):
        self._rows.inc()
        yield row_to_record(row, self._label)


def check_table(table: str, endpoints: Optional[Endpoints], project: Optional[str] = None) -> list[str]:
    """The column names of `table` ('PROJECT.DATASET.TABLE'), read before the
    job starts, as files are matched: raises BigQueryInputError saying what
    to do when the table is missing or lacks the columns of an event."""
    from apitools.base.py.exceptions import HttpError

    table_project, dataset, table_id = table.split(".")
    bq = endpoints.wrapper() if endpoints is not None else bigquery_tools.BigQueryWrapper()
    where = f" at {endpoints.rest}" if endpoints is not None else ""
    try:
        found = bq.get_table(table_project, dataset, table_id)
    except HttpError as err:
        if err.status_code == 404:
            raise BigQueryInputError(
                f"--input {PREFIX}{table}: no such BigQuery table{where}. Check the project, dataset and table "
                "names; the streaming job archives its events to the table of its --events_table") from None
        raise BigQueryInputError(f"--input {PREFIX}{table}: BigQuery answered HTTP {err.status_code}{where}: "
                                 f"{err.content[:300]!r}") from None
    columns = [field.name for field in (found.schema.fields if found.schema else [])]
    missing = [name for name in ENVELOPE if name != "role" and name not in columns]
    if "role" not in columns and "kind" not in columns:
        missing.append("role (or kind)")
    if missing:
        raise BigQueryInputError(f"--input {PREFIX}{table}: the table has no column {', '.join(missing)}; an events "
                                 f"table needs event_id, role (or kind), event_time and the spec's fields "
                                 f"(its columns: {columns})")
    return columns
