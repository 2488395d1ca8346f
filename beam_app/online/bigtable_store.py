"""The online store's Bigtable table (layout.py says what it holds): made
ready by the job that writes it, written by the stream, read by the service.

google-cloud-bigtable reaches the emulator when BIGTABLE_EMULATOR_HOST is set
(tests start `cbtemulator` on a free port: beam_app/local/stack.py).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Iterable, Optional, Sequence

from beam_app.online.layout import (FINGERPRINT, META, META_ROW, OBSERVATIONS, THROUGH, Cell, RowRead, TablePath,
                                    horizon_s)

_MS = 1000


class StoreUnavailable(RuntimeError):
    """The store did not answer in time (down, or unreachable): the service answers 503."""


class StoreMismatch(ValueError):
    """The table holds another spec's features, or forgets observations sooner than the windows need."""


def _client(path: TablePath, admin: bool = False):
    from google.cloud import bigtable

    return bigtable.Client(project=path.project, admin=admin)


def open_table(path: TablePath, admin: bool = False):
    return _client(path, admin).instance(path.instance).table(path.table)


def _timestamp(ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms)


def prepare_store(path: TablePath, fingerprint: str, max_window_s: int, allowed_lateness_s: int,
                  create: bool) -> None:
    """Makes sure the table can hold this spec's store: creates it (with `create`) with family
    "o" kept for the horizon and the meta row; refuses a table of another spec, or one whose
    observations are dropped sooner than the horizon."""
    from google.cloud.bigtable import column_family

    table = open_table(path, admin=True)
    horizon = dt.timedelta(seconds=horizon_s(max_window_s, allowed_lateness_s))
    if not table.exists():
        if not create:
            raise StoreMismatch(f"online store {path} does not exist: create it (--create_tables) or name another")
        table.create(column_families={OBSERVATIONS: column_family.MaxAgeGCRule(horizon),
                                      META: column_family.MaxVersionsGCRule(1)})
    families = table.list_column_families()
    if OBSERVATIONS not in families or META not in families:
        raise StoreMismatch(f"online store {path} has the column families {sorted(families)}, not "
                            f"{OBSERVATIONS!r} and {META!r}: it is not an online store of this product")
    kept = getattr(families[OBSERVATIONS].gc_rule, "max_age", None)
    if kept is not None and kept < horizon:
        raise StoreMismatch(f"online store {path} keeps observations {kept.total_seconds():.0f} s, less than the "
                            f"longest window plus --allowed_lateness_s ({horizon.total_seconds():.0f} s): "
                            "answers would miss observations")
    stored = store_fingerprint(table)
    if stored is None:
        row = table.direct_row(META_ROW)
        row.set_cell(META, FINGERPRINT, fingerprint.encode())
        row.commit()
    elif stored != fingerprint:
        raise StoreMismatch(f"online store {path} holds the features of spec {stored[:12]}, not {fingerprint[:12]}: "
                            "give each spec a table of its own")


def _meta_cell(table, qualifier: bytes, timeout_s: Optional[float] = None) -> Optional[bytes]:
    from google.cloud.bigtable import row_filters

    kwargs = {"retry": _retry(timeout_s)} if timeout_s else {}
    row = table.read_row(META_ROW, filter_=row_filters.RowFilterChain([
        row_filters.ColumnQualifierRegexFilter(re.escape(qualifier)), row_filters.CellsColumnLimitFilter(1)]),
        **kwargs)
    cells = row.cells.get(META, {}).get(qualifier) if row is not None else None
    return cells[0].value if cells else None


def store_fingerprint(table) -> Optional[str]:
    value = _meta_cell(table, FINGERPRINT)
    return value.decode() if value is not None else None


def write_cells(table, cells: Sequence[Cell]) -> None:
    """One mutate_rows call for the cells; RuntimeError when any row failed (the
    bundle is retried: each cell is rewritten the same, so a retry is harmless)."""
    if not cells:
        return
    rows = []
    for cell in cells:
        row = table.direct_row(cell.row)
        row.set_cell(OBSERVATIONS, cell.qualifier, cell.value, timestamp=_timestamp(cell.timestamp_ms))
        rows.append(row)
    failed = [(rows[i].row_key, status.message) for i, status in enumerate(table.mutate_rows(rows)) if status.code]
    if failed:
        raise RuntimeError(f"the online store refused {len(failed)} of {len(rows)} rows, e.g. {failed[0]}")


def write_through(table, through_us: int) -> None:
    """The stream's progress: a cell stamped with it, so the newest cell is the furthest progress,
    whoever wrote it last (max versions 1 keeps that one)."""
    row = table.direct_row(META_ROW)
    row.set_cell(META, THROUGH, str(through_us).encode(), timestamp=_timestamp(through_us // _MS))
    row.commit()


def _retry(timeout_s: float):
    from google.api_core import retry as retries
    from google.cloud.bigtable.table import DEFAULT_RETRY_READ_ROWS

    return DEFAULT_RETRY_READ_ROWS.with_deadline(timeout_s) if timeout_s else retries.Retry(deadline=0)


class OnlineStore:
    """The service's reads: a request's rows and the progress mark, in one call
    (google-cloud-bigtable's data client: about half the client time of the
    older Table API on the same rows). Anything that is not an answer within
    `timeout_s` is StoreUnavailable."""

    def __init__(self, path: TablePath, timeout_s: float = 2.0):
        from google.cloud.bigtable.data import BigtableDataClient

        self.path = path
        self._client = BigtableDataClient(project=path.project)
        self._table = self._client.get_table(path.instance, path.table)
        self._timeout_s = timeout_s

    def _meta(self, qualifier: bytes) -> Optional[bytes]:
        from google.cloud.bigtable.data import row_filters

        with _unavailable(self.path):
            row = self._table.read_row(META_ROW, row_filter=row_filters.RowFilterChain([
                row_filters.FamilyNameRegexFilter(META),
                row_filters.ColumnQualifierRegexFilter(re.escape(qualifier) + rb"\z"),
                row_filters.CellsColumnLimitFilter(1)]), operation_timeout=self._timeout_s)
        return row.cells[0].value if row is not None and row.cells else None

    def fingerprint(self) -> Optional[str]:
        value = self._meta(FINGERPRINT)
        return value.decode() if value is not None else None

    def through_us(self) -> Optional[int]:
        value = self._meta(THROUGH)
        return int(value) if value is not None else None

    def read(self, reads: Iterable[RowRead], with_through: bool = False):
        """row -> its (qualifier, value) cells within each read's time range (the newest version of
        each); with_through, (that, the progress mark or None), read in the same call."""
        from google.cloud.bigtable.data import ReadRowsQuery
        from google.cloud.bigtable.data import row_filters

        keys, parts = [], []
        for read in reads:
            keys.append(read.row)
            parts.append(row_filters.RowFilterChain([
                row_filters.RowKeyRegexFilter(re.escape(read.row) + rb"\z"),
                row_filters.FamilyNameRegexFilter(OBSERVATIONS),
                row_filters.TimestampRangeFilter(_timestamp(read.start_ms), _timestamp(read.end_ms))]))
        if with_through:
            keys.append(META_ROW)
            parts.append(row_filters.RowFilterChain([
                row_filters.RowKeyRegexFilter(re.escape(META_ROW) + rb"\z"),
                row_filters.FamilyNameRegexFilter(META),
                row_filters.ColumnQualifierRegexFilter(re.escape(THROUGH) + rb"\z")]))
        out: dict[bytes, list[tuple[bytes, bytes]]] = {}
        through_us = None
        if parts:
            query = ReadRowsQuery(row_keys=keys, row_filter=row_filters.RowFilterChain([
                parts[0] if len(parts) == 1 else row_filters.RowFilterUnion(parts),
                row_filters.CellsColumnLimitFilter(1)]))
            with _unavailable(self.path):
                rows = self._table.read_rows(query, operation_timeout=self._timeout_s)
            for row in rows:
                if row.row_key == META_ROW:
                    through_us = int(row.cells[0].value) if row.cells else None
                else:
                    out[row.row_key] = [(cell.qualifier, cell.value) for cell in row.cells]
        return (out, through_us) if with_through else out

    def close(self) -> None:
        self._client.close()


class _unavailable:
    """Turns the client's failures (refused connections, deadlines, retries given up) into StoreUnavailable."""

    def __init__(self, path: TablePath):
        self._path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from google.api_core import exceptions

        if error is not None and isinstance(error, (exceptions.GoogleAPIError, exceptions.RetryError)):
            raise StoreUnavailable(f"online store {self._path} did not answer: {error}") from error
        return False
