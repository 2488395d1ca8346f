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


def _data_client(project: str):
    """google-cloud-bigtable's data client, whose ReadRows streams are read on the calling
    thread: by default gRPC starts a thread for every streaming call, which cost the service
    0.9 ms of CPU per read here (of 2.8). The channel option is gRPC's own
    (ChannelOptions.SingleThreadedUnaryStream); the client builds its channels in
    `_build_grpc_channel` (pinned google-cloud-bigtable 2.50.2), for the emulator without
    the options it is given, hence the emulator's channel made here."""
    import functools

    import grpc
    from google.cloud.bigtable.data import BigtableDataClient
    from google.cloud.bigtable.data._sync_autogen._swappable_channel import SwappableChannel

    one_thread = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)

    class OneThreadClient(BigtableDataClient):
        def _build_grpc_channel(self, *args, **kwargs):
            options = [*(kwargs.pop("options", None) or []), one_thread]
            if self._emulator_host is not None:
                return SwappableChannel(functools.partial(grpc.insecure_channel, self._emulator_host, options=options))
            return super()._build_grpc_channel(*args, options=options, **kwargs)

    return OneThreadClient(project=project)


class OnlineStore:
    """The service's reads: a request's rows and the progress mark, in one call
    (google-cloud-bigtable's data client: about half the client time of the
    older Table API on the same rows). Anything that is not an answer within
    `timeout_s` is StoreUnavailable."""

    def __init__(self, path: TablePath, timeout_s: float = 2.0):
        self.path = path
        self._client = _data_client(path.project)
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
        """row -> its (qualifier, value) cells within its read's time range (the newest version of
        each); with_through, (that, the progress mark or None).

        One ReadRows call per window length, each with a single time range (the
        earliest start and latest end of its reads: the engine applies each request's
        exact bounds): a filter per row (a row-key regex in a union) cost the emulator
        7.6 ms of CPU per request against 1.1 ms so. The meta row rides with the widest
        window's call; its `through` cell, stamped with the mark, is in that range unless
        the store is further behind than the window, when it is read on its own.
        Cells after a call's times may come back too: the engine reads only [t - W, t)."""
        from google.cloud.bigtable.data import ReadRowsQuery
        from google.cloud.bigtable.data import row_filters

        by_window: dict[int, list[RowRead]] = {}
        for read in reads:
            by_window.setdefault(read.window_s, []).append(read)
        out: dict[bytes, list[tuple[bytes, bytes]]] = {}
        through_us, widest = None, max(by_window, default=None)
        with _unavailable(self.path):
            for window_s, window_reads in by_window.items():
                keys = list(dict.fromkeys(read.row for read in window_reads))
                if with_through and window_s == widest:
                    keys.append(META_ROW)
                # With the meta row, no end to the range: its newest `through` cell is stamped
                # with the mark, which may be later than the calls' times (older versions wait
                # for garbage collection, and one of them would be read instead).
                end_ms = None if META_ROW in keys else max(read.end_ms for read in window_reads)
                query = ReadRowsQuery(row_keys=keys, row_filter=row_filters.RowFilterChain([
                    row_filters.TimestampRangeFilter(_timestamp(min(read.start_ms for read in window_reads)),
                                                     _timestamp(end_ms) if end_ms is not None else None),
                    row_filters.CellsColumnLimitFilter(1)]))
                for row in self._table.read_rows(query, operation_timeout=self._timeout_s):
                    if row.row_key == META_ROW:
                        through_us = next((int(cell.value) for cell in row.cells if cell.qualifier == THROUGH), None)
                    else:
                        out[row.row_key] = [(cell.qualifier, cell.value) for cell in row.cells]
        if with_through and through_us is None:
            through_us = self.through_us()
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
