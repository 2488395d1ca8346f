"""The consistency job on a hand-made history and served log, every expected
value computed by hand: what is equal, what differs, and why.

History (flights spec), times on 2026-12-01 UTC (ids shortened here; the spec's pattern in the code):
    o1 10:00 EWR UA delay 10    o2 10:30 EWR UA delay 20    o3 08:00 EWR AA delay 6
Every observation and request goes to ORD; none has a tail number (the tail-number features are missing).
Requests: r1 11:00 EWR UA, r2 11:20 JFK UA, r3 11:40 EWR UA, r4 11:50 EWR UA (not logged).
By hand, [t - W, t):
    r1: origin 1h {o1, o2}: count 2, mean 15, max 20; origin 3h {o3, o1, o2}: mean 12, population stddev
        sqrt(((6-12)^2 + (10-12)^2 + (20-12)^2) / 3) = sqrt(104/3); carrier UA 3h {o1, o2}: 15;
        route EWR-ORD 24h {o3, o1, o2}: 12; dest ORD 3h [08:00, 11:00) {o3 (at the start: in), o1, o2}: 12
    r2: origin JFK: count 0, the rest missing (route JFK-ORD too); carrier UA 3h {o1, o2}: 15;
        dest ORD 3h [08:20, 11:20) {o1, o2}: 15
    r3: origin 1h [10:40, 11:40) is empty: count 0, mean and max missing; origin 3h {o1, o2} (o3 is before
        08:40): mean 15, stddev 5; carrier UA 3h {o1, o2}: 15; route 24h {o3, o1, o2}: 12; dest 3h {o1, o2}: 15
"""

from __future__ import annotations

import json
import math

import pytest

from beam_app import consistency
from beam_app.monitoring import recompute
from beam_app.common.errors import EXIT_CHECK_FAILED, EXIT_USAGE, UsageError
from beam_app.common.options import pipeline_options
from beam_app.bigquery.client import bigquery_client, ensure_table
from beam_app.bigquery.tables import (PREDICTIONS_SCHEMA, event_row, events_schema, prediction_row, served_columns,
                                     served_features_row)
from transforms.events import Event, InvalidRecord, event_to_json, rfc3339_to_time_us
from transforms.examples import RequestKey, row_values
from transforms.skew import Arrived, explain_group, group_values
from transforms.spec import SpecError, load_spec
from transforms.feature_layout import FeatureRow, feature_groups

PROJECT = "test-project"
SPEC = load_spec("flights")
DAY = "2026-12-01T"


def _t(hhmm: str) -> int:
    return rfc3339_to_time_us(f"{DAY}{hhmm}:00Z")


def _observation(event_id: str, hhmm: str, origin: str, carrier: str, delay: float) -> Event:
    return Event(event_id, "observation", _t(hhmm), {"origin": origin, "carrier": carrier, "dest": "ORD",
                                                     "tailnum": None, "dep_delay": delay})


def _request(event_id: str, hhmm: str, origin: str) -> Event:
    return Event(event_id, "request", _t(hhmm), {"carrier": "UA", "origin": origin, "dest": "ORD", "distance": 719.0,
                                                 "hour": 6, "minute": 0, "month": 12, "day_of_week": 2,
                                                 "tailnum": None, "dep_delay": 1.0})


def _features(count_1h, mean_1h, max_1h, mean_3h, carrier_3h, route_24h=None, dest_3h=None, std_3h=None) -> tuple:
    """The 11 features in spec order; the three tail-number ones missing (no request has a tail number)."""
    return (count_1h, mean_1h, max_1h, mean_3h, carrier_3h, None, None, None, route_24h, dest_3h, std_3h)


O1, O2, O3 = (_observation("20261201-UA1-EWR", "10:00", "EWR", "UA", 10.0),
              _observation("20261201-UA2-EWR", "10:30", "EWR", "UA", 20.0),
              _observation("20261201-AA3-EWR", "08:00", "EWR", "AA", 6.0))
R1, R2, R3, R4 = (_request("20261201-UA11-EWR", "11:00", "EWR"), _request("20261201-UA12-JFK", "11:20", "JFK"),
                  _request("20261201-UA13-EWR", "11:40", "EWR"), _request("20261201-UA14-EWR", "11:50", "EWR"))
O2_ID, O3_ID = "20261201-UA2-EWR/observation", "20261201-AA3-EWR/observation"
# By hand (module docstring), in spec order: departures 1h, mean 1h, max 1h, mean 3h, carrier mean 3h,
# (tail number: missing), route mean 24h, dest mean 3h, origin stddev 3h.
BY_HAND = {"r1": _features(2, 15.0, 20.0, 12.0, 15.0, 12.0, 12.0, math.sqrt(104 / 3)),
           "r2": _features(0, None, None, None, 15.0, None, 15.0, None),
           "r3": _features(0, None, None, 15.0, 15.0, 12.0, 15.0, 5.0)}


def _served(request: Event, features: tuple, job_start: str = "09:00", processed: str = "12:00") -> dict:
    """A served-features row with these (hand-made) features, encoded as the job encodes them."""
    assert len(features) == len(SPEC.windowed_features)
    values = row_values(SPEC, FeatureRow(request, tuple(None if v is None else float(v) for v in features)))
    return served_features_row(RequestKey(request.event_id, request.time_us), values, "v1", SPEC.fingerprint,
                               _t(processed), _t(job_start))


def _run(tmp_path, served: list[dict], history: str, **flags) -> dict:
    log = tmp_path / "served.ndjson"
    log.write_text("".join(json.dumps(row) + "\n" for row in served))
    argv = ["--runner", "DirectRunner", "--served_features", str(log), "--input", history,
            "--output", str(tmp_path / "out"), *[f"--{k}={v}" for k, v in flags.items()]]
    return consistency.run(argv)


def test_the_engine_by_hand():
    import numpy as np

    groups = {group.key: group for group in feature_groups(SPEC)}
    values = group_values(SPEC, groups[("origin",)], R1, [O1, O2, O3])
    assert (values["origin_departures_1h"], values["origin_dep_delay_mean_1h"], values["origin_dep_delay_max_1h"],
            values["origin_dep_delay_mean_3h"]) == (2, 15.0, 20.0, 12.0)
    assert values["origin_dep_delay_std_3h"] == float(np.float32(math.sqrt(104 / 3)))  # encoded as float32
    assert group_values(SPEC, groups[("carrier",)], R2, [O1, O2, O3])["carrier_dep_delay_mean_3h"] == 15.0
    route = group_values(SPEC, groups[("origin", "dest")], R3, [O1, O2, O3])
    assert route == {"route_dep_delay_mean_24h": 12.0, "route_dep_delay_mean_24h_present": 1}
    assert group_values(SPEC, groups[("dest",)], R2, [O1, O2, O3])["dest_dep_delay_mean_3h"] == 15.0
    # No tail number on the request: its features are missing, the sequence all zeros.
    assert group_values(SPEC, groups[("tailnum",)], R1, [O1, O2, O3]) == {
        "tailnum_last_dep_delay_24h": 0.0, "tailnum_last_dep_delay_24h_present": 0,
        "tailnum_seconds_since_last_24h": 0.0, "tailnum_seconds_since_last_24h_present": 0,
        "tailnum_dep_delay_last3_24h": [0.0, 0.0, 0.0], "tailnum_dep_delay_last3_24h_present": 0,
        "tailnum_dep_delay_last3_24h_length": 0}


def test_a_late_observation_and_a_cold_start_are_explained_exactly():
    origin = {group.key: group for group in feature_groups(SPEC)}[("origin",)]
    history = [Arrived(O1, _t("10:00")), Arrived(O2, _t("11:05")), Arrived(O3, _t("08:00"))]  # o2 arrived late
    # r1 answered without o2: origin 1h {o1}: 1, 10, 10; 3h {o3, o1}: mean 8, stddev |10 - 6| / 2 = 2.
    served = _served(R1, _features(1, 10.0, 10.0, 8.0, 15.0, std_3h=2.0))
    explanation = explain_group(SPEC, origin, R1, served, history, _t("07:00"))
    assert explanation.category == "late_observation" and explanation.observations == (O2_ID,)
    # A job started at 09:00 without a warm start, o2 on time: 1h {o1, o2}; 3h {o1, o2} (no o3): mean 15,
    # stddev 5.
    served = _served(R1, _features(2, 15.0, 20.0, 15.0, 15.0, std_3h=5.0))
    history = [Arrived(O1, _t("10:00")), Arrived(O2, _t("10:30")), Arrived(O3, _t("08:00"))]
    explanation = explain_group(SPEC, origin, R1, served, history, _t("09:00"))
    assert explanation.category == "no_bootstrap" and explanation.observations == (O3_ID,)
    # The stddev alone off (the other values as without o3): no subset gives both, unexplained.
    assert explain_group(SPEC, origin, R1, _served(R1, _features(2, 15.0, 20.0, 15.0, 15.0, std_3h=2.0)), history,
                         _t("09:00")) is None
    # Values no subset of the history gives: unexplained.
    assert explain_group(SPEC, origin, R1, _served(R1, _features(5, 15.0, 20.0, 12.0, 15.0)), history,
                         _t("09:00")) is None


@pytest.mark.slow
def test_consistency_over_files_counts_every_feature_and_lists_the_unexplained(tmp_path):
    history = tmp_path / "history.ndjson"
    history.write_text("".join(event_to_json(e) + "\n" for e in (O1, O2, O3, R1, R2, R3, R4)))
    served = [_served(R1, BY_HAND["r1"]), _served(R2, BY_HAND["r2"]),
              _served(R3, (7, *BY_HAND["r3"][1:])),  # a count no history gives
              _served(_request("20261201-UA19-EWR", "11:30", "EWR"), BY_HAND["r1"])]  # no such request in the history
    # An open range is the log's own, 11:00 to 11:40: r4 (11:50) is not missing from it.
    assert _run(tmp_path, served, str(history))["requests_recomputable_not_logged"] == 0
    summary = _run(tmp_path, served, str(history), start=f"{DAY}10:00:00Z", end="2026-12-02")  # a date: midnight
    assert (summary["rows_logged"], summary["requests_compared"], summary["requests_equal"]) == (4, 3, 2)
    assert summary["rows_logged_not_recomputable"] == 1 and summary["requests_recomputable_not_logged"] == 1  # r4
    assert (summary["differences"], summary["differences_unexplained"]) == (1, 1)
    assert [record["event_id"] for record in summary["unexplained"]] == [R3.event_id]
    assert summary["unexplained"][0]["columns"] == {"origin_departures_1h": {"served": 7, "batch": 0}}
    features = summary["features"]
    assert set(features) == {column.name for column in served_columns(SPEC)}
    assert features["origin_departures_1h"] == {"compared": 3, "equal": 2, "different": 1,
                                                "logged_not_recomputable": 1, "recomputable_not_logged": 1}
    assert features["carrier_dep_delay_mean_3h"]["equal"] == 3
    assert summary["mismatch_fraction"] == pytest.approx(1 / 3) and summary["passed"] is False
    assert (summary["start"], summary["end"]) == (f"{DAY}10:00:00Z", "2026-12-02T00:00:00Z")
    assert _run(tmp_path, served, str(history), max_mismatch_fraction=0.5)["passed"] is True
    assert summary["history_records_refused"] == 0


@pytest.mark.slow
def test_consistency_over_the_events_archive_explains_late_and_cold(tmp_path, bigquery_emulator):
    """The history from the events table, as the streaming job archives it: arrival times explain."""
    table = f"{PROJECT}:consistency_case.events"
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    ensure_table(client, table, events_schema(SPEC))
    names = list(events_schema(SPEC))[4:]
    arrivals = dict(zip((e.event_id for e in (O1, O2, O3, R1, R2, R3, R4)),
                        ("10:00", "11:05", "08:00", "11:00", "11:20", "11:40", "11:50")))
    rows = [event_row(e, [field["name"] for field in names], _t(arrivals[e.event_id]))
            for e in (O1, O2, O3, R1, R2, R3, R4)]
    assert not client.insert_rows_json(".".join(table.replace(":", ".").split(".")), rows)
    served = [
        # Answered at 11:00 before o2 arrived: every group misses it. Origin 1h {o1}: 1, 10, 10; origin 3h
        # {o3, o1}: mean 8, stddev 2; carrier {o1}: 10; route {o3, o1}: 8; dest [08:00, 11:00) {o3, o1}: 8.
        _served(R1, _features(1, 10.0, 10.0, 8.0, 10.0, 8.0, 8.0, 2.0)),
        # A cold job from 10:15 (o2 arrived at 11:05, before r2's 11:20): carrier and dest {o2}: 20.
        _served(R2, _features(0, None, None, None, 20.0, None, 20.0, None), job_start="10:15"),
        _served(R3, BY_HAND["r3"]),
    ]
    # The predictions, for the completeness check: r2 has none (r4 has one, after --end).
    predictions = f"{PROJECT}:consistency_case.predictions"
    ensure_table(client, predictions, PREDICTIONS_SCHEMA)
    assert not client.insert_rows_json(f"{PROJECT}.consistency_case.predictions", [
        prediction_row(RequestKey(r.event_id, r.time_us), 3.0, "v1", SPEC.fingerprint, _t("12:00"), "streaming")
        for r in (R1, R3, R4)])
    summary = _run(tmp_path, served, f"bq:{table}", bigquery_endpoint=bigquery_emulator.endpoint,
                   start=f"{DAY}10:45:00Z", end=f"{DAY}11:45:00Z", predictions=predictions, allowed_lateness_s=0)
    complete = summary["completeness"]
    assert (complete["requests"], complete["answered"], complete["without_prediction_overdue"]) == (3, 2, 1)
    assert [record["event_id"] for record in complete["missing"]] == [R2.event_id]
    assert (summary["requests_compared"], summary["requests_equal"], summary["differences"]) == (3, 1, 2)
    assert summary["differences_unexplained"] == 0
    assert summary["explained_by"] == {"late_observation": 1, "no_bootstrap": 1}
    differences = {}
    for path in (tmp_path / "out").glob("differences-*.ndjson"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            differences[record["event_id"]] = record
    assert differences[R1.event_id]["categories"] == ["late_observation"] and O2_ID in (
        differences[R1.event_id]["explanations"]["origin"])
    assert differences[R2.event_id]["categories"] == ["no_bootstrap"]
    assert summary["requests_recomputable_not_logged"] == 0  # r4 is after --end


# ---- The command line: flags, usage errors (exit 2), a failed check (exit 1) ----

def _options(*argv: str) -> consistency.ConsistencyOptions:
    return pipeline_options(consistency.ConsistencyOptions, list(argv))


@pytest.mark.parametrize("values,table", [
    (["bq:my-project.features.events"], "my-project.features.events"),
    (["bq:my-project:features.events"], "my-project.features.events"),
    (["my-project:features.events"], "my-project:features.events"),  # as --served_features takes a table
    (["history/*.ndjson"], None),
    (["flights.2013.csv"], None),  # dots, no colon: a file
    (["history.ndjson", "weather=weather.csv"], None),
    (None, None),
])
def test_the_history_is_a_table_or_files(values, table):
    assert consistency.history_table(values) == table


def test_a_history_table_comes_alone():
    with pytest.raises(UsageError, match="pass it alone"):
        consistency.history_table(["bq:my-project.features.events", "more.ndjson"])
    with pytest.raises(SpecError, match="bq:PROJECT.DATASET.TABLE"):
        consistency.history_table(["bq:features.events"])


@pytest.mark.parametrize("flag", ["--history", "--history_format", "--served_features_rate", "--max_mismatch_rate"])
def test_the_old_flag_names_are_refused(flag):
    with pytest.raises(UsageError, match=f"unknown flag {flag}"):
        _options(flag, "1")


def test_start_and_end_take_a_date_or_rfc3339():
    options = _options("--start", "2026-12-01", "--end", "2026-12-01T06:30:00Z")
    assert consistency.time_range_us(options.start, options.end) == (
        rfc3339_to_time_us("2026-12-01T00:00:00Z"), rfc3339_to_time_us("2026-12-01T06:30:00Z"))


@pytest.mark.parametrize("argv,message", [
    (["--input", "h.ndjson"], "give --served_features .* --predictions"),
    (["--predictions", "p.ndjson", "--input", "h.ndjson", "--allowed_lateness_s", "-1"],
     "--allowed_lateness_s is 0 or more"),
    (["--served_features", "s.ndjson"], "--input is required"),
    (["--served_features", "s.ndjson", "--input", "h.ndjson", "--served_features_fraction", "0"],
     "--served_features_fraction is above 0 and at most 1"),
    (["--served_features", "s.ndjson", "--input", "h.ndjson", "--max_mismatch_fraction", "-0.1"],
     "--max_mismatch_fraction is 0 or more"),
    (["--served_features", "s.ndjson", "--input", "h.ndjson", "--start", "yesterday"], "--start: expected"),
    (["--served_features", "s.ndjson", "--input", "h.ndjson", "--start", "2026-12-02", "--end", "2026-12-01"],
     "--end .* must be after --start"),
])
def test_usage_errors_say_what_to_fix(argv, message):
    with pytest.raises(UsageError, match=message):
        consistency.check_options(_options(*argv), SPEC)


def test_inputs_that_match_nothing_are_named(tmp_path):
    served = tmp_path / "served.ndjson"
    served.write_text("")
    with pytest.raises(FileNotFoundError, match="--served_features"):
        consistency.check_options(_options("--served_features", str(tmp_path / "none-*.ndjson"),
                                           "--input", str(served)), SPEC)
    with pytest.raises(FileNotFoundError, match="--input"):
        consistency.check_options(_options("--served_features", str(served),
                                           "--input", str(tmp_path / "none-*.ndjson")), SPEC)
    with pytest.raises(FileNotFoundError, match="--predictions"):
        consistency.check_options(_options("--predictions", str(tmp_path / "none-*.ndjson"),
                                           "--input", str(served)), SPEC)


def test_main_exits_2_on_a_usage_error_and_1_when_the_check_fails(monkeypatch, capsys):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # what main sets first
    monkeypatch.setattr("sys.argv", [consistency.PROG, "--history", "h.ndjson"])
    with pytest.raises(SystemExit) as exited:
        consistency.main()
    assert exited.value.code == EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"{consistency.PROG}: error: unknown flag --history")
    monkeypatch.setattr(consistency, "run", lambda argv: {"passed": False})
    with pytest.raises(SystemExit) as exited:
        consistency.main()
    assert exited.value.code == EXIT_CHECK_FAILED


def test_an_archive_row_becomes_the_validated_event_and_its_arrival(flights_spec):
    from beam_app.bigquery.tables import event_fields
    from transforms.parse import EventValidator

    names, validate = tuple(event_fields(flights_spec)), EventValidator(flights_spec)
    row = {"event_id": "20131201-UA1-EWR", "role": "observation", "event_time": "2013-12-01T10:00:00Z",
           "processing_time": "2026-12-06T10:00:02.5Z", "origin": "EWR", "carrier": "UA", "dest": "ORD",
           "tailnum": None, "dep_delay": 12.0, "unrelated": "x"}
    arrived = recompute.arrived_from_row(row, names, validate)
    assert arrived.event.event_id == "20131201-UA1-EWR" and arrived.event.role == "observation"
    assert arrived.event.time_us == 1_385_892_000_000_000
    assert arrived.event.fields["dep_delay"] == 12.0 and "unrelated" not in arrived.event.fields
    assert arrived.arrival_us == 1_796_551_202_500_000
    with pytest.raises(InvalidRecord, match="origin"):
        recompute.arrived_from_row({**row, "origin": "BOS"}, names, validate)
    with pytest.raises(KeyError):
        recompute.arrived_from_row({k: v for k, v in row.items() if k != "processing_time"}, names, validate)
