"""The consistency job's completeness check: every request of the history has a
streamed prediction, or is listed with its event_id and time. The expected sets
are computed here from the inputs, by set arithmetic, not by the check's code."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app import consistency
from beam_app.bigquery.tables import prediction_row
from beam_app.common.errors import EXIT_CHECK_FAILED
from beam_app.monitoring.completeness import completeness_verdict, overdue_before_us
from transforms import counters
from transforms.events import RawRecord, event_to_json, rfc3339_to_time_us, time_us_to_rfc3339
from transforms.parse import RecordParser
from transforms.examples import RequestKey
from tests.test_consistency import O1, O2, O3, SPEC, _request

HOUR_US = 3600 * 1_000_000


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), st.lists(st.integers(0, 10), min_size=1, max_size=3)),
       st.dictionaries(st.sampled_from("abcdefghij"), st.integers(1, 3)),
       st.one_of(st.none(), st.integers(0, 11)))
def test_every_request_is_answered_or_listed_once(requests, predicted, overdue_before):
    totals, missing = {}, []
    for event_id in sorted(set(requests) | set(predicted)):
        copies = [(time_us, event_to_json(_request(event_id, "11:00", "EWR")._replace(time_us=time_us)))
                  for time_us in requests.get(event_id, [])]
        result = completeness_verdict(event_id, copies, predicted.get(event_id, 0), overdue_before)
        for key, n in result.counts.items():
            totals[key] = totals.get(key, 0) + n
        if result.missing is not None:
            missing.append(result.missing)
    c = lambda counter: counter.of(totals)  # noqa: E731
    unanswered = set(requests) - set(predicted)
    assert c(counters.HISTORY_REQUESTS) == len(requests)
    assert c(counters.REQUESTS_ANSWERED) == len(set(requests) & set(predicted))
    assert c(counters.REQUESTS_ANSWERED_MORE_THAN_ONCE) == len({i for i in requests if predicted.get(i, 0) > 1})
    assert c(counters.PREDICTIONS_WITHOUT_REQUEST) == len(set(predicted) - set(requests))
    assert sorted(record["event_id"] for record in missing) == sorted(unanswered)  # each listed once
    overdue = {i for i in unanswered if overdue_before is not None and min(requests[i]) < overdue_before}
    assert {record["event_id"] for record in missing if record["overdue"]} == overdue
    assert c(counters.REQUESTS_WITHOUT_PREDICTION_OVERDUE) == len(overdue)
    for record in missing:  # the request itself, from its earliest copy
        assert rfc3339_to_time_us(record["event_time"]) == min(requests[record["event_id"]])
        assert record["role"] == "request" and record["origin"] == "EWR"


def test_overdue_is_measured_from_the_end_of_the_range_or_the_latest_event():
    assert overdue_before_us(10 * HOUR_US, 99 * HOUR_US, 3600) == 9 * HOUR_US
    assert overdue_before_us(None, 5 * HOUR_US, 0) == 5 * HOUR_US
    assert overdue_before_us(99 * HOUR_US, 5 * HOUR_US, 0) == 5 * HOUR_US  # an --end in the future
    assert overdue_before_us(None, None, 3600) is None


def _prediction(request, source: str = "streaming") -> dict:
    return prediction_row(RequestKey(request.event_id, request.time_us), 1.5, "v1", SPEC.fingerprint,
                          request.time_us + 1_000_000, source)


def test_the_job_lists_requests_without_a_prediction_and_fails_on_overdue_ones(tmp_path, monkeypatch, capsys):
    # Requests at 11:00 .. 11:50 (test_consistency's day) and one at 12:50. r2 and r5 have no
    # prediction, r3 has two, r4 only one from batch scoring (not the stream's); "x" is not in the history.
    r1, r2, r3, r4 = (_request(f"20261201-UA1{n}-EWR", time, "EWR") for n, time in
                      ((1, "11:00"), (2, "11:20"), (3, "11:40"), (4, "11:50")))
    r5 = _request("20261201-UA15-EWR", "12:50", "EWR")
    history = tmp_path / "history.ndjson"
    history.write_text("".join(event_to_json(e) + "\n" for e in (O1, O2, O3, r1, r2, r3, r4, r5)))
    stray = _request("20261201-UA19-EWR", "11:30", "EWR")
    rows = [_prediction(r1), _prediction(r3), _prediction(r3), _prediction(r4, "batch"), _prediction(stray)]
    predictions = tmp_path / "predictions.ndjson"
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--runner", "DirectRunner", "--predictions", str(predictions), "--input", str(history),
            "--output", str(tmp_path / "out"), "--allowed_lateness_s", "3600"]

    summary = consistency.run(argv)
    complete = summary["completeness"]
    listed = [json.loads(line) for path in sorted((tmp_path / "out").glob("missing-*.ndjson"))
              for line in path.read_text().splitlines()]
    # Open range: its end is the latest event (r5, 12:50); overdue means before 11:50.
    assert sorted((r["event_id"], r["event_time"], r["overdue"]) for r in listed) == [
        (r2.event_id, time_us_to_rfc3339(r2.time_us), True),
        (r4.event_id, time_us_to_rfc3339(r4.time_us), False),
        (r5.event_id, time_us_to_rfc3339(r5.time_us), False)]
    # Each is the request as the history holds it, so the publisher can send it again: each line,
    # "overdue" and all, parses back to the very request.
    parse = RecordParser(SPEC)
    for path in sorted((tmp_path / "out").glob("missing-*.ndjson")):
        for n, line in enumerate(path.read_text().splitlines()):
            (event,) = parse(RawRecord(f"{path}:{n}", line, "json"))
            assert event == {r.event_id: r for r in (r2, r4, r5)}[event.event_id]
    assert (complete["requests"], complete["answered"], complete["answered_more_than_once"],
            complete["without_prediction"], complete["without_prediction_overdue"],
            complete["predictions_without_request"]) == (5, 2, 1, 3, 1, 1)
    assert not summary["passed"]
    assert "requests_compared" in summary and summary["requests_compared"] == 0  # no served log given
    printed = capsys.readouterr().out
    assert f"no prediction       {r2.event_id} at {time_us_to_rfc3339(r2.time_us)} (overdue)" in printed
    assert summary["failures"] == ["overdue requests without a prediction: 1, older than --allowed_lateness_s 3600 "
                                   "before the range's end"]

    # Ending the range at 11:30 leaves only r1 and r2 in it; r2 stays overdue with no lateness allowed.
    summary = consistency.run(argv + ["--end", "2026-12-01T11:30:00Z", "--allowed_lateness_s", "0"])
    assert (summary["completeness"]["requests"], summary["completeness"]["without_prediction_overdue"]) == (2, 1)

    # With lateness of two hours nothing is overdue yet: reported, and the check passes.
    summary = consistency.run(argv + ["--allowed_lateness_s", "7200"])
    assert summary["completeness"]["without_prediction"] == 3 and summary["passed"]

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # what main sets first
    monkeypatch.setattr("sys.argv", [consistency.PROG, *argv])
    try:
        consistency.main()
    except SystemExit as exited:
        assert exited.code == EXIT_CHECK_FAILED
    else:
        raise AssertionError("an overdue request must fail the check")
