"""Reading the served-features log back: from its BigQuery table or from NDJSON files.

The streaming job logs, per prediction (or a sample of them), the features the
model received (beam_app/bigquery/tables.py: `served_features_schema`). Tools that
compare them with something else (the drift report, the consistency job) read
them with `read_served_rows`, one row at a time, so memory does not grow with
the size of the log:

    for row in read_served_rows("my-project:features.served_features",
                                start="2024-05-01T00:00:00Z", end="2024-05-02T00:00:00Z"):
        row["event_time"], row["model_version"], row["origin_dep_delay_mean_1h"]

    read_served_rows("logs/served-*.ndjson")   # the same rows as JSON lines
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator
from typing import Any, Optional

from beam_app.bigquery.client import bigquery_client, parse_table_spec
from transforms.events import datetime_to_time_us, rfc3339_to_time_us, time_us_to_rfc3339

TIMESTAMP_COLUMNS = ("event_time", "processing_time", "job_start_time")
_FILE_SUFFIXES = (".ndjson", ".jsonl", ".json", ".gz")
PAGE_SIZE = 10_000  # rows per BigQuery page: what is held at once


def is_table(table_or_glob: str) -> bool:
    """A BigQuery table (project:dataset.table or project.dataset.table)
    rather than a path or glob of NDJSON files."""
    if "/" in table_or_glob or "*" in table_or_glob or table_or_glob.lower().endswith(_FILE_SUFFIXES):
        return False
    try:
        parse_table_spec(table_or_glob)
    except ValueError:
        return False
    return True


def _time_us(text: Optional[str], what: str) -> Optional[int]:
    if text is None:
        return None
    try:
        return rfc3339_to_time_us(text)
    except ValueError:
        raise ValueError(f"{what}: expected an RFC 3339 timestamp like 2024-05-01T00:00:00Z, got {text!r}") from None


def read_served_rows(table_or_glob: str, start: Optional[str] = None, end: Optional[str] = None,
                     bigquery_endpoint: Optional[str] = None) -> Iterator[dict[str, Any]]:
    """The served-features rows with start <= event_time < end (RFC 3339; either
    bound optional), in no particular order, one dict per row: the metadata
    columns (timestamps as RFC 3339 strings, UTC, 'Z') and one value per served
    column (None where the row holds NULL).

    `table_or_glob`: a BigQuery table, read with a query that filters the time
    range (`bigquery_endpoint`: the emulator's URL; Google's BigQuery with the
    default credentials when None), or a path or glob (local or gs://) of NDJSON
    files with the same rows, timestamps as RFC 3339 strings.
    Raises ValueError on a malformed bound, FileNotFoundError when a glob matches nothing."""
    start_us, end_us = _time_us(start, "start"), _time_us(end, "end")
    if is_table(table_or_glob):
        return _table_rows(table_or_glob, start_us, end_us, bigquery_endpoint)
    return _file_rows(table_or_glob, start_us, end_us)


def _rfc3339(value: Any) -> Any:
    """A TIMESTAMP as the client gives it (an aware datetime) -> RFC 3339, as the job wrote it."""
    if isinstance(value, dt.datetime):
        return time_us_to_rfc3339(datetime_to_time_us(value))
    return value


def _table_rows(table: str, start_us: Optional[int], end_us: Optional[int],
                endpoint: Optional[str]) -> Iterator[dict[str, Any]]:
    from google.cloud import bigquery

    project, dataset, table_id = parse_table_spec(table)
    where, parameters = [], []
    if start_us is not None:
        where.append("event_time >= TIMESTAMP_MICROS(@start_us)")
        parameters.append(bigquery.ScalarQueryParameter("start_us", "INT64", start_us))
    if end_us is not None:
        where.append("event_time < TIMESTAMP_MICROS(@end_us)")
        parameters.append(bigquery.ScalarQueryParameter("end_us", "INT64", end_us))
    sql = f"SELECT * FROM `{project}.{dataset}.{table_id}`" + (f" WHERE {' AND '.join(where)}" if where else "")
    client = bigquery_client(project, endpoint)
    job = client.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=parameters))
    for row in job.result(page_size=PAGE_SIZE):  # pages are fetched as the iteration reaches them
        yield {name: _rfc3339(value) if name in TIMESTAMP_COLUMNS else value for name, value in row.items()}


def _file_rows(pattern: str, start_us: Optional[int], end_us: Optional[int]) -> Iterator[dict[str, Any]]:
    from apache_beam.io.filesystems import FileSystems

    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
        raise FileNotFoundError(f"served-features log {pattern!r} matches no file")
    for path in paths:
        with FileSystems.open(path) as raw:  # .gz is decompressed by its name
            for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    time_us = rfc3339_to_time_us(row["event_time"])
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{number}: not a served-features row: {err}") from None
                if (start_us is None or time_us >= start_us) and (end_us is None or time_us < end_us):
                    yield row
