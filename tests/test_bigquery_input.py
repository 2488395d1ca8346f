"""BigQuery input of the batch job (beam_app.bigquery.read): the row -> events
line conversion, the table spec and time filter, and the job reading the real
local-bigquery through Beam's DIRECT_READ source, against the same job on the
same events as an NDJSON file."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_app import batch
from beam_app.adapters import load_adapters
from beam_app.bigquery.client import bigquery_client, ensure_table
from beam_app.bigquery.read import (BigQueryInputError, parse_input_table, row_to_json_line, row_to_record,
                                     time_restriction)
from beam_app.common.inputs import Input, resolve_inputs
from beam_app.bigquery.tables import event_fields, event_row, events_schema
from tests.conftest import observation, read_examples, request
from tests.emulators import PROJECT
from tests.flights_slice import flights_lines, slice_events, weather_lines
from transforms.events import Event, RawRecord, event_to_json, rfc3339_to_time_us, time_us_to_rfc3339
from transforms.examples import parse_feature_spec
from transforms.parse import RecordParser
from transforms.spec import SpecError, load_spec

UTC = dt.timezone.utc
ARRIVED_US = rfc3339_to_time_us("2026-01-01T00:00:00Z")


# --- the row -> events line conversion ---------------------------------------------------------------------------

_values = st.one_of(
    st.none(), st.text(max_size=8), st.integers(-2 ** 62, 2 ** 62), st.floats(allow_infinity=True, allow_nan=True),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.just(UTC)),
    st.dates(), st.decimals(allow_nan=False, allow_infinity=False, places=9, min_value=-10 ** 9, max_value=10 ** 9))
_names = st.sampled_from(["event_id", "role", "kind", "event_time", "processing_time", "carrier", "distance", "x"])


def _same(written, value) -> bool:
    """`written` (from the JSON line) stands for the BigQuery value `value`, read back independently."""
    if isinstance(value, dt.datetime):
        return dt.datetime.fromisoformat(written.replace("Z", "+00:00")) == value
    if isinstance(value, dt.date):
        return dt.date.fromisoformat(written) == value
    if isinstance(value, decimal.Decimal):
        return (type(written) is int and written == value) or (type(written) is float and
                                                                math.isclose(written, float(value)))
    if isinstance(value, float) and math.isnan(value):
        return math.isnan(written)
    return written == value and type(written) is type(value)


@given(st.dictionaries(_names, _values, max_size=8))
@settings(max_examples=300, deadline=None)
def test_a_row_becomes_its_non_null_columns_as_a_json_line(row):
    body = json.loads(row_to_json_line(row))
    renamed = dict(row)
    if "role" not in renamed and "kind" in renamed:
        renamed["role"] = renamed.pop("kind")
    assert set(body) == {name for name, value in renamed.items() if value is not None}
    for name, written in body.items():
        assert _same(written, renamed[name]), (name, written, renamed[name])
    envelope = [name for name in body if name in ("event_id", "role", "event_time")]
    assert list(body)[:len(envelope)] == [name for name in ("event_id", "role", "event_time") if name in body]


def _archive_row(event: Event, spec) -> dict:
    """An events archive row as Beam's Avro decoding gives it: TIMESTAMPs as aware datetimes, NULL as None."""
    row = event_row(event, event_fields(spec), ARRIVED_US)
    for name in ("event_time", "processing_time"):
        row[name] = dt.datetime.fromisoformat(row[name].replace("Z", "+00:00"))
    return row


@given(st.integers(rfc3339_to_time_us("2013-01-01T00:00:00Z"), rfc3339_to_time_us("2013-12-31T23:59:59Z")),
       st.floats(-1440, 2880), st.one_of(st.none(), st.sampled_from(["N14228", "N24211"])), st.booleans(),
       st.sampled_from(["ok", "no_carrier", "late_hour", "bad_role"]))
@settings(max_examples=200, deadline=None)
def test_a_row_parses_as_its_ndjson_event_does(flights_spec, time_us, delay, tailnum, is_request, damage):
    """The parser takes a row's line exactly as the NDJSON line of the same event: same event, or same reason."""
    event = (request("20130101-UA1545-EWR", time_us, label=delay, tailnum=tailnum) if is_request else
             observation("20130101-UA1545-EWR", time_us, delay, tailnum=tailnum))
    fields = dict(event.fields)
    if damage == "no_carrier":
        fields["carrier"] = None
    elif damage == "late_hour":
        fields["hour"] = 24
    event = event._replace(fields=fields, role="arrival" if damage == "bad_role" else event.role)
    parse = RecordParser(flights_spec)

    def outcome(record):
        try:
            return parse(record)
        except ValueError as err:
            return str(err)

    record = row_to_record(_archive_row(event, flights_spec), "bq:p.d.t")
    assert record.source == "bq:p.d.t:20130101-UA1545-EWR" and record.kind == "json"
    assert outcome(record) == outcome(RawRecord("file:1", event_to_json(event), "json"))


def test_table_specs_and_the_time_filter():
    assert parse_input_table("bq:p.d.t") == parse_input_table("bq:p:d.t") == "p.d.t"
    for bad in ("bq:d.t", "bq:p.d.t.x", "bq:p..t", "bq:"):
        with pytest.raises(BigQueryInputError, match="bq:PROJECT.DATASET.TABLE"):
            parse_input_table(bad)
    since, until = rfc3339_to_time_us("2013-11-01T00:00:00Z"), rfc3339_to_time_us("2013-11-01T06:30:00.25Z")
    assert time_restriction(since, until) == ("event_time >= TIMESTAMP '2013-11-01 00:00:00.000000+00:00' AND "
                                              "event_time < TIMESTAMP '2013-11-01 06:30:00.250000+00:00'")
    assert time_restriction(None, None) is None
    with pytest.raises(BigQueryInputError, match="--end must be after --start"):
        time_restriction(until, since)


def test_a_query_needs_a_project_and_a_read_one_source():
    import apache_beam as beam

    from beam_app.bigquery.read import ReadBigQueryRecords

    with pytest.raises(BigQueryInputError, match="--input_query needs --project"):
        beam.Pipeline() | ReadBigQueryRecords(query="SELECT 1")
    with pytest.raises(BigQueryInputError, match="one of the two"):
        ReadBigQueryRecords(table="bq:p.d.t", query="SELECT 1")


def test_bigquery_inputs_resolve_only_where_they_are_read(flights_spec):
    assert resolve_inputs(flights_spec, ["bq:p:d.t", "/a.csv"], bigquery=True) == [Input("bq:p.d.t"), Input("/a.csv")]
    assert resolve_inputs(flights_spec, None, query="SELECT 1", bigquery=True) == [Input("bq:query")]
    with pytest.raises(SpecError, match="reads files only"):
        resolve_inputs(flights_spec, ["bq:p.d.t"])
    with pytest.raises(SpecError, match="not both"):
        resolve_inputs(flights_spec, ["bq:p.d.t"], query="SELECT 1", bigquery=True)


# --- the batch job on the real local-bigquery ---------------------------------------------------------------------

DATASET = "bq_input"
TABLE = f"{PROJECT}.{DATASET}.events"
DAYS = {(10, 31), (11, 1)}  # both sides of the spec's eval boundary


def _weather_events(spec) -> list[Event]:
    parse, lines = RecordParser(spec, load_adapters(spec)), weather_lines(lambda month, day: (month, day) in DAYS)
    header = tuple(lines[0].split(","))
    return [event for number, line in enumerate(lines[1:], 2)
            for event in parse(RawRecord(f"weather:{number}", line, "csv", header, source_name="weather"))]


@pytest.fixture(scope="module")
def archive(bigquery_emulator, tmp_path_factory):
    """The flights_weather slice in an events-archive table (three rows damaged), the good events as NDJSON,
    and the batch job's run on that file: the reference."""
    spec = load_spec("flights_weather")
    events = slice_events(spec, flights_lines(lambda month, day: (month, day) in DAYS)) + _weather_events(spec)
    requests = [e for e in events if e.role == "request"]
    departures = [e for e in events if e.role == "observation"]
    weather = [e for e in events if e.role == "weather"]
    damaged = {  # event_id -> (its row, the reason the parser must give)
        requests[100].event_id: ({**event_row(requests[100], event_fields(spec), ARRIVED_US), "carrier": None},
                                 "carrier: missing (required on request events)"),
        weather[10].event_id: ({**event_row(weather[10], event_fields(spec), ARRIVED_US), "wind_speed": 150.0},
                               "wind_speed: 150.0 is above the maximum 100"),
        departures[50].event_id: ({**event_row(departures[50], event_fields(spec), ARRIVED_US), "role": "arrival"},
                                  "role: expected one of ['request', 'observation', 'weather'], got 'arrival'"),
    }
    good = [e for e in events if e.event_id not in damaged]
    rows = [event_row(e, event_fields(spec), ARRIVED_US) for e in good] + [row for row, _ in damaged.values()]

    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    ensure_table(client, TABLE, events_schema(spec))
    for start in range(0, len(rows), 1000):
        assert not client.insert_rows_json(TABLE, rows[start:start + 1000])

    root = tmp_path_factory.mktemp("bq_input")
    ndjson = root / "events.ndjson"
    ndjson.write_text("".join(event_to_json(e) + "\n" for e in good))
    reference = batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", "flights_weather",
                           "--input", str(ndjson), "--output", str(root / "reference"), "--no_stats"])
    assert reference["dead_letters"] == 0 and all(reference["checks"].values())
    return {"spec": spec, "rows": rows, "good": good, "damaged": damaged, "root": root, "reference": reference,
            "endpoints": ["--bigquery_endpoint", bigquery_emulator.endpoint,
                          "--bigquery_grpc_endpoint", f"127.0.0.1:{bigquery_emulator.grpc_port}"]}


def _run(archive, name: str, *argv: str) -> dict:
    return batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", "flights_weather",
                      *archive["endpoints"], "--output", str(archive["root"] / name), "--no_stats", *argv])


def _examples(output, spec) -> dict:
    feature_spec = parse_feature_spec(spec)
    return {split: read_examples(output, split, feature_spec) for split in ("train", "eval", "test")}


def _dead_letters(output) -> list[dict]:
    return [json.loads(line) for path in sorted((output / "dead_letters").glob("*.ndjson"))
            for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_archive_table_gives_the_examples_of_its_ndjson_events(archive):
    summary = _run(archive, "table", "--input", f"bq:{PROJECT}:{DATASET}.events")
    reference = archive["reference"]
    assert summary["input"] == [f"bq:{TABLE}"]
    assert summary["records_read"] == len(archive["rows"]) == len(archive["good"]) + 3
    assert summary["dead_letters"] == 3
    for count in ("requests", "observations", "observations_by_kind", "feature_rows", "examples",
                  "unlabeled_requests"):
        assert summary[count] == reference[count], count
    assert all(summary["checks"].values()), summary["checks"]

    spec = archive["spec"]
    expected, read = _examples(archive["root"] / "reference", spec), _examples(archive["root"] / "table", spec)
    assert sum(map(len, expected.values())) == sum(reference["examples"].values()) > 1000
    for split, examples in expected.items():
        assert read[split].keys() == examples.keys(), split
        for event_id, example in examples.items():
            for name, value in example.items():
                assert np.array_equal(read[split][event_id][name], value), (split, event_id, name)

    letters = _dead_letters(archive["root"] / "table")
    assert {letter["source"]: letter["reason"] for letter in letters} == {
        f"bq:{TABLE}:{event_id}": reason for event_id, (_, reason) in archive["damaged"].items()}
    for letter in letters:  # the raw record is the row, as a line of events
        row = archive["damaged"][json.loads(letter["raw"])["event_id"]][0]
        assert json.loads(letter["raw"]) == {name: value for name, value in row.items() if value is not None}
        assert letter["stage"] == "parse"


def _in_range(rows, since: str, until: str) -> list[dict]:
    lo, hi = rfc3339_to_time_us(since), rfc3339_to_time_us(until)
    return [row for row in rows if lo <= rfc3339_to_time_us(row["event_time"]) < hi]


def _reach_back(time: str, spec) -> str:
    """`time` less the spec's longest window: where a read for requests from `time` on starts."""
    return time_us_to_rfc3339(rfc3339_to_time_us(time) - spec.max_window_s * 1_000_000)


@pytest.mark.slow
def test_start_and_end_read_what_the_range_needs_and_write_its_requests(archive):
    """--start/--end on a table: the rows read are [start - the longest window, end) (the one at the bound is
    read, the one at end is not), the examples are the labeled requests in [start, end), and each equals the
    example the job writes from the whole table."""
    spec = archive["spec"]
    times = sorted({row["event_time"] for row in archive["rows"]})
    start, end = times[len(times) // 3], times[2 * len(times) // 3]
    read = _in_range(archive["rows"], _reach_back(start, spec), end)
    assert 0 < len(_in_range(archive["rows"], start, end)) < len(read) < len(archive["rows"])
    summary = _run(archive, "range", "--input", f"bq:{TABLE}", "--start", start, "--end", end)
    assert summary["records_read"] == len(read)
    requests = [row for row in read if row["role"] == "request" and row["event_id"] not in archive["damaged"]]
    assert summary["requests"] == len(requests)
    assert summary["requests_outside_range"] == sum(row["event_time"] < start for row in requests) > 0
    labeled = {row["event_id"] for row in requests if row["event_time"] >= start and row["dep_delay"] is not None
               and row["carrier"] is not None}
    written = _examples(archive["root"] / "range", spec)
    assert set().union(*(examples.keys() for examples in written.values())) == labeled
    whole = _examples(archive["root"] / "reference", spec)
    for split, examples in written.items():
        for event_id, example in examples.items():
            for name, value in example.items():
                assert np.array_equal(whole[split][event_id][name], value), (split, event_id, name)
    assert all(summary["checks"].values()), summary["checks"]


@pytest.mark.slow
def test_a_query_with_a_kind_column_and_a_day_filter(archive, bigquery_emulator):
    """--input_query (a query job into a temporary table, then the same read) over a table of another shape:
    `kind` for the role, no processing_time; --start as a date."""
    columns = ", ".join(event_fields(archive["spec"]))
    query = f"SELECT event_id, role AS kind, event_time, {columns} FROM `{TABLE}` WHERE origin = 'JFK'"
    summary = _run(archive, "query", "--project", PROJECT, "--input_query", query, "--start", "2013-11-01")
    since = _reach_back("2013-11-01T00:00:00Z", archive["spec"])
    kept = [row for row in _in_range(archive["rows"], since, "9999-01-01T00:00:00Z") if row["origin"] == "JFK"]
    assert summary["input"] == [f"bq:query: {query}"]
    assert summary["records_read"] == len(kept) > 100
    damaged = {letter["source"].rsplit(":", 1)[1] for letter in _dead_letters(archive["root"] / "query")}
    assert damaged == {row["event_id"] for row in kept if row["event_id"] in archive["damaged"]}
    assert all(summary["checks"].values()), summary["checks"]
    datasets = [d.dataset_id for d in bigquery_client(PROJECT, bigquery_emulator.endpoint).list_datasets()]
    assert not [name for name in datasets if name.startswith("beam_temp_dataset_")]  # the query's results dropped


@pytest.mark.slow
def test_a_missing_table_or_one_without_roles_says_what_to_do(archive, bigquery_emulator):
    with pytest.raises(SpecError, match=f"bq:{PROJECT}.{DATASET}.nope: no such BigQuery table at "
                                        f"{bigquery_emulator.endpoint}. Check the project, dataset and table"):
        _run(archive, "missing", "--input", f"bq:{PROJECT}.{DATASET}.nope")
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    ensure_table(client, f"{PROJECT}.{DATASET}.no_roles", [
        {"name": "event_id", "type": "STRING"}, {"name": "event_time", "type": "TIMESTAMP"}])
    with pytest.raises(SpecError, match=r"the table has no column role \(or kind\)"):
        _run(archive, "no_roles", "--input", f"bq:{PROJECT}.{DATASET}.no_roles")
    # From the command line: the error and what to do, no traceback.
    done = subprocess.run([sys.executable, "-m", "beam_app.batch", "--input", f"bq:{PROJECT}:{DATASET}.nope",
                           *archive["endpoints"], "--output", str(archive["root"] / "cli")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"python -m beam_app.batch: error: --input bq:{PROJECT}.{DATASET}.nope: no such")


def test_on_dataflow_the_same_flag_is_beams_own_read(tmp_path):
    """Without endpoints the job reads through Beam's ReadFromBigQuery as it is (DIRECT_READ, its temporary
    dataset clean-up included), translated offline by the DataflowRunner as tests/test_dataflow_job does."""
    from tests.test_dataflow_job import staged_pipeline, step_names, translate

    argv = [f"--input=bq:{PROJECT}:{DATASET}.events", "--start=2013-11-01", "--spec=flights_weather",
            "--output=gs://test-bucket/batch"]

    def build(pipeline, options):
        job = options.view_as(batch.BatchOptions)
        spec = load_spec(job.spec)
        inputs = resolve_inputs(spec, job.input, query=job.input_query, bigquery=True)
        batch.construct(pipeline, job, spec, batch.split_from_options(spec, job), inputs, job.output)

    steps = step_names(staged_pipeline(translate(build, argv, tmp_path)))
    read = [name for name in steps if name.startswith("ReadBigQuery/")]
    assert "ReadBigQuery/ReadFromBigQuery/MapProjectToCleanup" in read  # Beam's _expand_direct_read
    assert "ReadBigQuery/RowsToRecords" in read
    assert not [name for name in read if "DropTemporaryDatasets" in name]  # the emulator's clean-up is not there


@pytest.mark.slow
def test_a_read_response_over_grpcs_default_4_mib(bigquery_emulator):
    """The emulator answers a stream of up to 100k rows in one ReadRows message: the channel must take
    messages over gRPC's default 4 MiB receive limit, as the Storage API client's own channels do."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from beam_app.bigquery.read import Endpoints, ReadBigQueryRecords

    spec, table = load_spec("flights"), f"{PROJECT}.{DATASET}.wide"
    client = bigquery_client(PROJECT, bigquery_emulator.endpoint)
    ensure_table(client, table, events_schema(spec))
    rows = [{"event_id": f"20131101-UA{n}-EWR", "role": "observation", "event_time": "2013-11-01T10:00:00Z",
             "processing_time": "2026-01-01T00:00:00Z", "tailnum": f"{n:06d}" + "N" * 3000} for n in range(2000)]
    for start in range(0, len(rows), 500):
        assert not client.insert_rows_json(table, rows[start:start + 500])
    assert sum(len(json.dumps(row)) for row in rows) > 6_000_000

    endpoints = Endpoints(bigquery_emulator.endpoint, f"127.0.0.1:{bigquery_emulator.grpc_port}")
    with beam.Pipeline("DirectRunner") as pipeline:
        tails = (pipeline | ReadBigQueryRecords(table=f"bq:{table}", endpoints=endpoints)
                 | beam.Map(lambda record: json.loads(record.text)["tailnum"][:6]))
        assert_that(tails, equal_to([f"{n:06d}" for n in range(2000)]))
