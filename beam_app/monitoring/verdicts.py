"""The consistency job's verdicts on one request: the rows the streaming job
served for it against the features the batch engine recomputes from the
history. Pure: beam_app/consistency.py moves the data and sums the counts.

    judge(served rows, recomputed values or None, columns, fingerprint, expected_in_log)
        -> Verdicts(counts {counter key: n}, differences (served row, its differing columns))

The verdicts, by what the two sides hold:

- served rows and recomputed features: each row of the job's spec is compared
  column by column, bit for bit (None == None); the request is equal when
  every compared row is, different when any row differs;
- served rows, nothing recomputed (no such request in the history): each row
  is logged but not recomputable;
- recomputed features, no served row: recomputable but not logged, when the
  log should hold the request (in the range and in the served sample:
  `must_be_logged`), else no verdict;
- a row served under another spec fingerprint is counted and not compared
  (a request with no row of the job's spec is neither equal nor different);
- a request served more than once (a restarted or retried job) is counted,
  and each of its rows judged on its own.

The counter keys are transforms/counters.py's.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

from beam_app.bigquery.tables import in_served_sample
from transforms import counters
from transforms.counters import COMPARED, DIFFERENT, EQUAL, LOGGED_NOT_RECOMPUTABLE, RECOMPUTABLE_NOT_LOGGED
from transforms.events import Event
from transforms.skew import differing_columns


class Difference(NamedTuple):
    """A served row that differs from the recomputed features: its position among
    the request's rows in serving order, the row, and per differing column
    {"served": value, "batch": value}."""

    index: int
    served: Mapping[str, Any]
    columns: dict[str, dict[str, Any]]


class Verdicts(NamedTuple):
    """What one request adds to the job's counts (counter key -> n) and its differences."""

    counts: dict[str, int]
    differences: tuple[Difference, ...]


def serving_order(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A request's served rows in the order they were served (RFC 3339 processing times sort as text)."""
    return sorted(rows, key=lambda row: (row["processing_time"], row["model_version"]))


def must_be_logged(event_id: str, time_us: int, start_us: Optional[int], end_us: Optional[int],
                   logged: Optional[tuple[int, int]], fraction: float) -> bool:
    """Whether the served-features log should hold a request: its time in the
    checked range [start, end), and its id in the served sample at `fraction`.
    An open bound is the log's own: `logged` is its (first, last) served event
    time, both included; None (nothing logged) covers nothing."""
    if logged is None:
        return False
    after_start = time_us >= (start_us if start_us is not None else logged[0])
    before_end = time_us < end_us if end_us is not None else time_us <= logged[1]
    return after_start and before_end and in_served_sample(event_id, fraction)


def judge(served: Sequence[Mapping[str, Any]], recomputed: Optional[Mapping[str, Any]], columns: Sequence[str],
          fingerprint: str, expected_in_log: bool = False) -> Verdicts:
    """The verdicts on one request (module docstring).

    served: its rows in the log, any order (judged in serving_order).
    recomputed: its served columns as the batch engine computes them
      (transforms.examples.row_values), None when the history has no such request.
    columns: the served columns compared. fingerprint: the spec the job checks.
    expected_in_log: with no served row, whether the log should have held one (must_be_logged)."""
    counts: dict[str, int] = {}

    def count(counter: counters.Counter, n: int = 1) -> None:
        counts[counter.key] = counts.get(counter.key, 0) + n

    def count_columns(verdict: str) -> None:
        for name in columns:
            count(counters.column_verdict(name, verdict))

    if not served:
        if recomputed is not None and expected_in_log:
            count(counters.REQUESTS_RECOMPUTABLE_NOT_LOGGED)
            count_columns(RECOMPUTABLE_NOT_LOGGED)
        return Verdicts(counts, ())
    count(counters.REQUESTS_LOGGED)
    if len(served) > 1:
        count(counters.REQUESTS_LOGGED_MORE_THAN_ONCE)
    differences, compared = [], 0
    for index, row in enumerate(serving_order(served)):
        count(counters.ROWS_LOGGED)
        if row["spec_fingerprint"] != fingerprint:
            count(counters.ROWS_SPEC_MISMATCH)  # features of another spec: nothing to compare them with
            continue
        if recomputed is None:
            count(counters.ROWS_LOGGED_NOT_RECOMPUTABLE)
            count_columns(LOGGED_NOT_RECOMPUTABLE)
            continue
        compared += 1
        count(counters.ROWS_COMPARED)
        differing = set(differing_columns(row, recomputed, columns))
        for name in columns:
            count(counters.column_verdict(name, COMPARED))
            count(counters.column_verdict(name, DIFFERENT if name in differing else EQUAL))
        if differing:
            differences.append(Difference(index, row, {
                name: {"served": row.get(name), "batch": recomputed.get(name)}
                for name in columns if name in differing}))
    if compared:
        count(counters.REQUESTS_DIFFERENT if differences else counters.REQUESTS_EQUAL)
    return Verdicts(counts, tuple(differences))


def difference_record(event_id: str, request: Event, difference: Difference) -> dict[str, Any]:
    """A difference as the job explains and writes it: the served row's metadata,
    the request (its keys find the observations that explain it), the row and
    the differing columns."""
    row = difference.served
    return {"event_id": event_id, "event_time": row["event_time"], "model_version": row["model_version"],
            "processing_time": row["processing_time"], "job_start_time": row["job_start_time"],
            "request": request, "served": row, "columns": difference.columns}
