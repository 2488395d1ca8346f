"""What a running job has written to its BigQuery tables: the DirectRunner
reports no metrics for streaming pipelines, BigQuery does.

    tables ({name: (table spec, schema)}, as `job_tables` gives them), start time
      -> per table: SELECT <group>, COUNT(*) ... WHERE processing_time >= start (`count_sql`)
      -> {"predictions": total, "predictions_by_version": {version: n}, "dead_letters": {stage: n},
          "served_features": total, "events": {role: n}} (`written_counts`)
"""

from __future__ import annotations

from typing import Mapping, Optional

from beam_app.bigquery.tables import DEAD_LETTERS, EVENTS, PREDICTIONS, SERVED_FEATURES
from transforms.events import time_us_to_rfc3339

# The column each table's rows are counted by.
GROUPED_BY = {PREDICTIONS: "model_version", DEAD_LETTERS: "stage", SERVED_FEATURES: "model_version", EVENTS: "role"}


def count_sql(table: str, group: str, since_us: int) -> str:
    """The query counting a table's rows made since `since_us`, by `group`
    (table: project:dataset.table or project.dataset.table)."""
    from beam_app.bigquery.client import parse_table_spec

    project, dataset, table_id = parse_table_spec(table)
    return (f"SELECT {group}, COUNT(*) AS n FROM `{project}.{dataset}.{table_id}` "
            f"WHERE processing_time >= TIMESTAMP('{time_us_to_rfc3339(since_us)}') GROUP BY {group}")


def written_counts(grouped: Mapping[str, Mapping[str, int]]) -> dict:
    """{table name: {group value: rows}} -> the counts a summary reads: the
    predictions' total, and per model version (a running job may switch);
    the served features' total (by version it says what the predictions' say);
    dead letters per stage and events per role as they are."""
    counts = {name: dict(by_group) for name, by_group in grouped.items()}
    if SERVED_FEATURES in counts:
        counts[SERVED_FEATURES] = sum(counts[SERVED_FEATURES].values())
    counts["predictions_by_version"] = counts[PREDICTIONS]
    counts[PREDICTIONS] = sum(counts["predictions_by_version"].values())
    return counts


def table_counts(tables: Mapping[str, tuple[str, tuple]], endpoint: Optional[str], since_us: int,
                 deadline_s: float = 10) -> dict:
    """Rows written to each table since `since_us` (`written_counts`). A
    BigQuery that does not answer fails within `deadline_s` (the client's own
    retry would wait 600 s)."""
    from google.api_core.retry import Retry

    from beam_app.bigquery.client import bigquery_client, parse_table_spec

    grouped = {}
    for name, (table, _) in tables.items():
        group = GROUPED_BY[name]
        client = bigquery_client(parse_table_spec(table)[0], endpoint)
        job = client.query(count_sql(table, group, since_us), retry=Retry(deadline=deadline_s), job_retry=None,
                           timeout=deadline_s)
        rows = job.result(timeout=deadline_s, retry=Retry(deadline=deadline_s))
        grouped[name] = {row[group]: row["n"] for row in rows}
    return written_counts(grouped)
