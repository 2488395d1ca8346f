"""BigQuery clients for Google's endpoint or another one (the local emulator,
see beam_app.local.stack), and idempotent table creation from our schemas.

Beam's WriteToBigQuery has no endpoint option. Its `test_client` argument
takes one object that Beam uses both as the apitools client (`tables`,
`datasets`, `jobs`, `tabledata`) and as the google-cloud-bigquery client
(`insert_rows_json`): EndpointBigQueryClient is that object for any endpoint.
It travels with the pipeline to the workers, so it pickles as (project,
endpoint) and builds its clients on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery


def parse_table_spec(table_spec: str) -> tuple[str, str, str]:
    """'project:dataset.table' or 'project.dataset.table' -> (project, dataset, table)."""
    parts = table_spec.replace(":", ".", 1).split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"expected a table as project:dataset.table or project.dataset.table, got {table_spec!r}")
    project, dataset, table = parts
    return project, dataset, table


def bigquery_client(project: str, endpoint: str | None = None) -> bigquery.Client:
    """A client for `endpoint` without credentials, or for Google's BigQuery
    with the default credentials when `endpoint` is None."""
    if endpoint is None:
        return bigquery.Client(project=project)
    return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint))


def table_exists(client: bigquery.Client, table_spec: str) -> bool:
    from google.api_core.exceptions import NotFound

    try:
        client.get_table(".".join(parse_table_spec(table_spec)))
    except NotFound:
        return False
    return True


def ensure_table(client: bigquery.Client, table_spec: str, schema: Sequence[Mapping[str, Any]]) -> bigquery.Table:
    """Creates the dataset and the table if missing (idempotent). `schema` is
    a list of BigQuery REST field dicts ({name, type, mode, description}).
    An existing table must have every field of `schema`: otherwise every
    insert would fail, so this says so now."""
    project, dataset, table_id = parse_table_spec(table_spec)
    client.create_dataset(bigquery.Dataset(f"{project}.{dataset}"), exists_ok=True)
    fields = [bigquery.SchemaField.from_api_repr(dict(field)) for field in schema]
    table = client.create_table(bigquery.Table(f"{project}.{dataset}.{table_id}", schema=fields), exists_ok=True)
    missing = {field.name for field in fields} - {field.name for field in table.schema}
    if missing:
        raise ValueError(f"BigQuery table {table_spec} exists without the fields {sorted(missing)}")
    return table


class EndpointBigQueryClient:
    """WriteToBigQuery's `test_client` for a BigQuery at `endpoint`
    (e.g. http://127.0.0.1:9050), without credentials."""

    def __init__(self, project: str, endpoint: str) -> None:
        self.project = project
        self.endpoint = endpoint.rstrip("/")
        self._apitools: Any = None
        self._cloud: bigquery.Client | None = None

    def __getstate__(self) -> dict[str, str]:
        return {"project": self.project, "endpoint": self.endpoint}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(**state)

    @property
    def apitools(self) -> Any:
        """Beam's own apitools BigqueryV2 client."""
        if self._apitools is None:
            from apache_beam.io.gcp.internal.clients.bigquery import BigqueryV2

            self._apitools = BigqueryV2(url=f"{self.endpoint}/bigquery/v2/", credentials=None, get_credentials=False,
                                        response_encoding="utf8")
        return self._apitools

    @property
    def cloud(self) -> bigquery.Client:
        """The google-cloud-bigquery client."""
        if self._cloud is None:
            self._cloud = bigquery_client(self.project, self.endpoint)
        return self._cloud

    @property
    def tables(self) -> Any:
        return self.apitools.tables

    @property
    def datasets(self) -> Any:
        return self.apitools.datasets

    @property
    def jobs(self) -> Any:
        return self.apitools.jobs

    @property
    def tabledata(self) -> Any:
        return self.apitools.tabledata

    def insert_rows_json(self, table: Any, json_rows: Sequence[Mapping[str, Any]], **kwargs: Any) -> Sequence[dict]:
        return self.cloud.insert_rows_json(table, json_rows, **kwargs)
