"""The consistency job's verdicts on one request (beam_app/monitoring/verdicts.py),
every count worked by hand on two served columns, then a property over any
served rows.

Columns: a (a feature) and a_present (its presence flag); the job's spec
fingerprint is "fp". Times are RFC 3339, as the log holds them.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app.monitoring.verdicts import Difference, difference_record, judge, must_be_logged, serving_order
from transforms import counters
from transforms.events import Event

COLUMNS = ("a", "a_present")
FP = "fp"
RECOMPUTED = {"a": 1.5, "a_present": 1}


def _row(a, present=1, processed="2026-12-01T12:00:00Z", fingerprint=FP, version="v1") -> dict:
    return {"event_id": "r1", "event_time": "2026-12-01T11:00:00Z", "model_version": version,
            "spec_fingerprint": fingerprint, "processing_time": processed, "job_start_time": "2026-12-01T09:00:00Z",
            "a": a, "a_present": present}


def _counts(*pairs) -> dict[str, int]:
    """(Counter, n) pairs -> the counts judge returns."""
    return {counter.key: n for counter, n in pairs}


def _columns(verdict: str, n: int = 1) -> list:
    return [(counters.column_verdict(name, verdict), n) for name in COLUMNS]


def test_equal():
    verdicts = judge([_row(1.5)], RECOMPUTED, COLUMNS, FP)
    assert verdicts.counts == _counts(
        (counters.REQUESTS_LOGGED, 1), (counters.ROWS_LOGGED, 1), (counters.ROWS_COMPARED, 1),
        *_columns(counters.COMPARED), *_columns(counters.EQUAL), (counters.REQUESTS_EQUAL, 1))
    assert verdicts.differences == ()


def test_different_bit_for_bit():
    row = _row(1.5000001)  # one column off in the seventh decimal: different, the flag equal
    verdicts = judge([row], RECOMPUTED, COLUMNS, FP)
    assert verdicts.counts == _counts(
        (counters.REQUESTS_LOGGED, 1), (counters.ROWS_LOGGED, 1), (counters.ROWS_COMPARED, 1),
        *_columns(counters.COMPARED), (counters.column_verdict("a", counters.DIFFERENT), 1),
        (counters.column_verdict("a_present", counters.EQUAL), 1), (counters.REQUESTS_DIFFERENT, 1))
    assert verdicts.differences == (Difference(0, row, {"a": {"served": 1.5000001, "batch": 1.5}}),)


def test_missing_equals_missing_and_not_a_value():
    recomputed = {"a": None, "a_present": 0}
    assert judge([_row(None, 0)], recomputed, COLUMNS, FP).counts[counters.REQUESTS_EQUAL.key] == 1
    (difference,) = judge([_row(0.0, 0)], recomputed, COLUMNS, FP).differences
    assert difference.columns == {"a": {"served": 0.0, "batch": None}}


def test_logged_but_not_recomputable():
    """No such request in the history: each row counted, no request equal or different."""
    verdicts = judge([_row(1.5)], None, COLUMNS, FP)
    assert verdicts.counts == _counts((counters.REQUESTS_LOGGED, 1), (counters.ROWS_LOGGED, 1),
                                      (counters.ROWS_LOGGED_NOT_RECOMPUTABLE, 1),
                                      *_columns(counters.LOGGED_NOT_RECOMPUTABLE))
    assert verdicts.differences == ()


def test_recomputable_but_not_logged_only_where_the_log_should_hold_it():
    assert judge([], RECOMPUTED, COLUMNS, FP, expected_in_log=True).counts == _counts(
        (counters.REQUESTS_RECOMPUTABLE_NOT_LOGGED, 1), *_columns(counters.RECOMPUTABLE_NOT_LOGGED))
    assert judge([], RECOMPUTED, COLUMNS, FP, expected_in_log=False) == ({}, ())


def test_logged_more_than_once_judges_each_row_in_serving_order():
    later_equal = _row(1.5, processed="2026-12-01T12:00:05Z")
    first_different = _row(2.0, processed="2026-12-01T12:00:01Z")
    verdicts = judge([later_equal, first_different], RECOMPUTED, COLUMNS, FP)
    assert verdicts.counts == _counts(
        (counters.REQUESTS_LOGGED, 1), (counters.REQUESTS_LOGGED_MORE_THAN_ONCE, 1), (counters.ROWS_LOGGED, 2),
        (counters.ROWS_COMPARED, 2), *_columns(counters.COMPARED, 2),
        (counters.column_verdict("a", counters.DIFFERENT), 1), (counters.column_verdict("a", counters.EQUAL), 1),
        (counters.column_verdict("a_present", counters.EQUAL), 2), (counters.REQUESTS_DIFFERENT, 1))
    assert verdicts.differences == (Difference(0, first_different, {"a": {"served": 2.0, "batch": 1.5}}),)


def test_spec_mismatch_is_counted_not_compared():
    other = _row(9.0, fingerprint="other")
    assert judge([other], RECOMPUTED, COLUMNS, FP) == (_counts(
        (counters.REQUESTS_LOGGED, 1), (counters.ROWS_LOGGED, 1), (counters.ROWS_SPEC_MISMATCH, 1)), ())
    # Beside a row of the job's spec, only that one is compared.
    verdicts = judge([other, _row(1.5, processed="2026-12-01T12:00:01Z")], RECOMPUTED, COLUMNS, FP)
    assert verdicts.counts == _counts(
        (counters.REQUESTS_LOGGED, 1), (counters.REQUESTS_LOGGED_MORE_THAN_ONCE, 1), (counters.ROWS_LOGGED, 2),
        (counters.ROWS_SPEC_MISMATCH, 1), (counters.ROWS_COMPARED, 1), *_columns(counters.COMPARED),
        *_columns(counters.EQUAL), (counters.REQUESTS_EQUAL, 1))


def test_must_be_logged_in_the_range_and_the_sample():
    # A given range: [100, 200).
    assert [must_be_logged("r1", t, 100, 200, (150, 160), 1.0) for t in (99, 100, 199, 200)] == [
        False, True, True, False]
    # Open bounds: the log's own first and last served times, both in.
    assert [must_be_logged("r1", t, None, None, (150, 180), 1.0) for t in (149, 150, 180, 181)] == [
        False, True, True, False]
    assert must_be_logged("r1", 150, None, 200, None, 1.0) is False  # nothing logged: an open range covers nothing
    # The sample: the first 8 bytes of the id's sha256 below fraction * 2^64. r5's are 0x5eb2...: in at 0.5
    # (0x5eb2 / 0x10000 = 0.37); r2's are 0xdb77... (0.86): out.
    assert [must_be_logged(event_id, 150, 100, 200, (0, 0), 0.5) for event_id in ("r5", "r2")] == [True, False]
    assert [must_be_logged(event_id, 150, 100, 200, (0, 0), 0.9) for event_id in ("r5", "r2")] == [True, True]


def test_difference_record_carries_the_row_metadata_and_the_request():
    row = _row(2.0)
    request = Event("r1", "request", 1, {})
    record = difference_record("r1", request, Difference(0, row, {"a": {"served": 2.0, "batch": 1.5}}))
    assert record == {"event_id": "r1", "event_time": row["event_time"], "model_version": "v1",
                      "processing_time": row["processing_time"], "job_start_time": row["job_start_time"],
                      "request": request, "served": row, "columns": {"a": {"served": 2.0, "batch": 1.5}}}


_VALUES = st.sampled_from([None, 0.0, 1.5, 2.0])
_ROWS = st.lists(st.tuples(_VALUES, st.sampled_from([0, 1]), st.sampled_from([FP, "other"])), max_size=4)
_RECOMPUTED = st.one_of(st.none(), st.fixed_dictionaries({"a": _VALUES, "a_present": st.sampled_from([0, 1])}))


@settings(max_examples=300, deadline=None)
@given(rows=_ROWS, recomputed=_RECOMPUTED, expected_in_log=st.booleans(), data=st.data())
def test_the_counts_add_up_for_any_served_rows(rows, recomputed, expected_in_log, data):
    served = [_row(a, present, processed=f"2026-12-01T12:00:{i:02d}Z", fingerprint=fingerprint)
              for i, (a, present, fingerprint) in enumerate(rows)]
    verdicts = judge(served, recomputed, COLUMNS, FP, expected_in_log)
    c = lambda counter: counter.of(verdicts.counts)  # noqa: E731

    # Every served row has exactly one fate; every compared row a verdict per column.
    assert c(counters.ROWS_LOGGED) == len(served) == (
        c(counters.ROWS_SPEC_MISMATCH) + c(counters.ROWS_COMPARED) + c(counters.ROWS_LOGGED_NOT_RECOMPUTABLE))
    for name in COLUMNS:
        compared = c(counters.column_verdict(name, counters.COMPARED))
        assert compared == c(counters.ROWS_COMPARED) == (
            c(counters.column_verdict(name, counters.EQUAL)) + c(counters.column_verdict(name, counters.DIFFERENT)))
    # A request is logged or not, equal or different once, and only when a row was compared.
    assert c(counters.REQUESTS_LOGGED) == (1 if served else 0)
    assert c(counters.REQUESTS_LOGGED_MORE_THAN_ONCE) == (1 if len(served) > 1 else 0)
    assert c(counters.REQUESTS_EQUAL) + c(counters.REQUESTS_DIFFERENT) == (1 if c(counters.ROWS_COMPARED) else 0)
    assert c(counters.REQUESTS_DIFFERENT) == (1 if verdicts.differences else 0)
    assert c(counters.REQUESTS_RECOMPUTABLE_NOT_LOGGED) == (
        1 if not served and recomputed is not None and expected_in_log else 0)
    # A difference per compared row with a differing column, pointing at that row in serving order.
    ordered = serving_order(served)
    differing = [i for i, row in enumerate(ordered) if row["spec_fingerprint"] == FP and recomputed is not None
                 and any(row[name] != recomputed[name] for name in COLUMNS)]
    assert [d.index for d in verdicts.differences] == differing
    assert all(ordered[d.index] is d.served and d.columns for d in verdicts.differences)
    # The order the log gives the rows in changes nothing.
    shuffled = data.draw(st.permutations(served))
    assert judge(shuffled, recomputed, COLUMNS, FP, expected_in_log) == verdicts
