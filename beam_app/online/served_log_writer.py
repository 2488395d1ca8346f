"""The service's served-features rows to BigQuery, off the request path.

Rows queue in memory and a thread inserts them every FLUSH_S (streaming
inserts, an insertId per row: a retried call does not duplicate them). A call
that fails (BigQuery down) is retried at the next flush with the same rows;
rows BigQuery refuses are counted and logged with its reason. The queue is
bounded (MAX_QUEUED): beyond it the oldest rows are dropped, counted and
logged, so a long outage costs log rows, never the service's memory or its
answers. `counts` says what happened to every row.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Optional

from google.cloud.bigquery.retry import DEFAULT_RETRY

from beam_app.bigquery.client import bigquery_client, parse_table_spec

FLUSH_S = 1.0
MAX_QUEUED = 100_000
BATCH = 500


class ServedLogWriter:
    def __init__(self, table: str, endpoint: Optional[str] = None, flush_s: float = FLUSH_S):
        project, dataset, table_id = parse_table_spec(table)
        self.table = table
        self._table_id = f"{project}.{dataset}.{table_id}"
        self._client = bigquery_client(project, endpoint)
        self._flush_s = flush_s
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.counts = {"queued": 0, "written": 0, "refused": 0, "dropped": 0, "failed_calls": 0}
        self._thread = threading.Thread(target=self._run, name="served-log", daemon=True)
        self._thread.start()

    def add(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._queue.extend(rows)
            self.counts["queued"] += len(rows)
            overflow = len(self._queue) - MAX_QUEUED
            for _ in range(max(0, overflow)):
                self._queue.popleft()
            if overflow > 0:
                self.counts["dropped"] += overflow
                logging.error("served-features log %s: %d rows dropped, BigQuery has not taken them for too long",
                              self.table, overflow)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_s):
            self.flush()

    def flush(self) -> None:
        """Inserts what is queued, BATCH rows per call; stops at the first call that fails (kept for the next)."""
        while True:
            with self._lock:
                rows = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            if not rows:
                return
            ids = [f"{row['event_id']}:{row['model_version']}:{row['processing_time']}" for row in rows]
            try:
                errors = self._client.insert_rows_json(self._table_id, rows, row_ids=ids, timeout=10,
                                                      retry=DEFAULT_RETRY.with_deadline(10))
            except Exception as err:  # noqa: BLE001 - any failure of the call: keep the rows, try again later
                with self._lock:
                    self._queue.extendleft(reversed(rows))
                self.counts["failed_calls"] += 1
                logging.warning("served-features log %s: insert failed, retrying in %.0f s: %s", self.table,
                                self._flush_s, err)
                return
            refused = len(errors)
            self.counts["refused"] += refused
            self.counts["written"] += len(rows) - refused
            for error in errors[:3]:
                logging.error("served-features log %s refused a row: %s", self.table, error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()
