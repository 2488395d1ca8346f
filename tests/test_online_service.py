"""The online service on the real Bigtable emulator, with a real trained model:
features worked out by hand, a key never seen, malformed calls, the store's
lag, a store of another spec, and an outage of the store (503, then answers
again once it is back). The HTTP layer runs in process (Starlette's test
client drives the real ASGI app); tests/test_online_e2e.py runs it under uvicorn."""

from __future__ import annotations

import math
import time

import pytest

from beam_app import serve
from beam_app.local.stack import BigtableEmulator, free_port
from beam_app.online.bigtable_store import (StoreMismatch, open_table, prepare_store, write_cells,
                                            write_through)
from beam_app.online.layout import observation_cells, parse_table_path
from tests.emulators import wait_until
from transforms.events import Event, time_us_to_rfc3339
from transforms.feature_layout import EventLayout, feature_groups
from transforms.spec import load_spec

SPEC = load_spec("flights")
MIN = 60_000_000


def _instance(event_id="20261206-UA1545-EWR", **change) -> dict:
    return {"event_id": event_id, "role": "request", "carrier": "UA", "origin": "EWR", "dest": "ORD",
            "distance": 719, "hour": 5, "minute": 15, "month": 12, "day_of_week": 6, "tailnum": "N1", **change}


def _observation(event_id: str, time_us: int, delay: float, **fields) -> Event:
    return Event(event_id, "observation", time_us, {"carrier": "UA", "origin": "EWR", "dest": "ORD", "tailnum": "N1",
                                                    "dep_delay": delay, **fields})


def _fill(table_path: str, observations, through_us: int) -> None:
    path = parse_table_path(table_path)
    prepare_store(path, SPEC.fingerprint, SPEC.max_window_s, 3600, create=True)
    layout, groups = EventLayout.of(SPEC), feature_groups(SPEC)
    table = open_table(path)
    write_cells(table, [cell for event in observations for cell in observation_cells(layout, groups, event)])
    # As the stream leaves it: a mark a second, older ones until garbage collection takes them.
    for mark_us in (through_us - 30 * 10 ** 6, through_us - 10 ** 6, through_us):
        write_through(table, mark_us)


def _client(table_path: str, model_dir, *flags: str):
    from starlette.testclient import TestClient

    args = serve.parser().parse_args(["--model", str(model_dir), "--online_table", table_path, *flags])
    service = serve.Service(args)
    return service, TestClient(service.app)


@pytest.fixture(scope="module")
def model_dir(trained_model):
    return trained_model[1]


def test_answers_hold_the_features_worked_out_by_hand(bigtable_emulator, model_dir):
    now = int(time.time() * 1e6)
    t = now - 5 * 10 ** 6
    table = "projects/test-project/instances/local/tables/by-hand"
    _fill(table, [
        _observation("20261206-UA1-EWR", t - 10 * MIN, 10.0),
        _observation("20261206-UA2-EWR", t - 20 * MIN, 30.0),
        _observation("20261206-UA3-EWR", t - 70 * MIN, 50.0),  # outside 1 h, inside 3 h
        _observation("20261206-UA4-EWR", t - 25 * 60 * MIN, 99.0),  # outside every window
        _observation("20261206-UA5-EWR", t, 77.0),  # at t: not before it
        _observation("20261206-B61-JFK", t - 5 * MIN, 5.0, carrier="B6", origin="JFK", dest="LAX", tailnum="N9"),
    ], through_us=now)
    service, client = _client(table, model_dir)
    response = client.post("/v1/predict", json={"instances": [
        _instance(event_time=time_us_to_rfc3339(t)),
        _instance("20261206-AA7-LGA", origin="LGA", carrier="AA", dest="MIA", tailnum="N404",
                  event_time=time_us_to_rfc3339(t))]})
    assert response.status_code == 200, response.text
    seen, never = response.json()["predictions"]
    assert seen["features"] == {
        "origin_departures_1h": 2.0, "origin_dep_delay_mean_1h": 20.0, "origin_dep_delay_max_1h": 30.0,
        "origin_dep_delay_mean_3h": 30.0, "carrier_dep_delay_mean_3h": 30.0, "tailnum_last_dep_delay_24h": 10.0,
        "tailnum_seconds_since_last_24h": 600.0, "tailnum_dep_delay_last3_24h": [10.0, 30.0, 50.0],
        "route_dep_delay_mean_24h": 30.0, "dest_dep_delay_mean_3h": 30.0,
        "origin_dep_delay_std_3h": math.sqrt(800 / 3)}
    # A key never seen: counts 0, the rest missing, as batch gives them.
    assert never["features"] == {name: 0.0 if name == "origin_departures_1h" else [] if name.endswith("last3_24h")
                                 else None for name in seen["features"]}
    for answer in (seen, never):
        assert answer["model_version"] == model_dir.name and answer["spec_fingerprint"] == SPEC.fingerprint
        assert answer["store"] == {"complete_through": time_us_to_rfc3339(now), "lag_s": 0.0, "complete": True}
        assert isinstance(answer["prediction"], float) and math.isfinite(answer["prediction"])
    assert seen["prediction"] != never["prediction"]
    # Alone, the same answer (a read has no side effect on the store); the prediction to float32's rounding
    # (the model's batch of one adds in another order than its batch of two).
    again = client.post("/v1/predict", json={"instances": [_instance(event_time=time_us_to_rfc3339(t))]}).json()
    assert again["predictions"][0]["features"] == seen["features"]
    assert again["predictions"][0]["prediction"] == pytest.approx(seen["prediction"], rel=1e-5, abs=1e-5)

    # A request later than the store's progress: answered, and its lag said.
    ahead = client.post("/v1/predict", json={"instances": [_instance(event_time=time_us_to_rfc3339(now + 90 * 10 ** 6))]})
    store = ahead.json()["predictions"][0]["store"]
    assert store["complete"] is False and store["lag_s"] == 90.0

    metrics = client.get("/metrics").text
    assert 'online_calls_total{status="200"} 3.0' in metrics and "online_instances_total 4.0" in metrics
    assert f'online_model_info{{version="{model_dir.name}"}} 1.0' in metrics
    assert "online_store_lag_seconds 90.0" in metrics and "online_call_seconds_bucket" in metrics
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["store_complete_through"] == time_us_to_rfc3339(now)


def test_bad_calls_get_400_with_the_field_and_reason(bigtable_emulator, model_dir):
    table = "projects/test-project/instances/local/tables/bad-calls"
    _fill(table, [], through_us=int(time.time() * 1e6))
    service, client = _client(table, model_dir)
    cases = [
        (b"{not json", None, "the body is not JSON"),
        (b'{"instances": []}', "instances", "non-empty list"),
        (None, "origin", "origin: unknown value 'BOS'"),
        (None, "event_time", "more than --allowed_lateness_s 3600"),
    ]
    for body, field, reason in cases:
        if body is None:
            change = {"origin": "BOS"} if field == "origin" else {
                "event_time": time_us_to_rfc3339(int(time.time() * 1e6) - 2 * 3600 * 10 ** 6)}
            response = client.post("/v1/predict", json={"instances": [_instance(), _instance(**change)]})
        else:
            response = client.post("/v1/predict", content=body)
        assert response.status_code == 400, response.text
        error = response.json()
        assert reason in error["error"] and error["field"] == field
        assert error["instance"] == (1 if body is None else None)
    assert 'online_errors_total{reason="bad_request"} 4.0' in client.get("/metrics").text


def test_a_store_of_another_spec_or_too_short_a_memory_is_refused(bigtable_emulator, model_dir):
    from beam_app.common.errors import UsageError

    path = parse_table_path("projects/test-project/instances/local/tables/other-spec")
    prepare_store(path, "0" * 64, SPEC.max_window_s, 3600, create=True)
    with pytest.raises(StoreMismatch, match="holds the features of spec 000000000000"):
        prepare_store(path, SPEC.fingerprint, SPEC.max_window_s, 3600, create=False)
    with pytest.raises(UsageError, match="holds the features of spec 000000000000"):
        _client(str(path), model_dir)
    # Made for a lateness of 10 min, asked for 1 h: observations would be gone before the windows are.
    short = parse_table_path("projects/test-project/instances/local/tables/short-memory")
    prepare_store(short, SPEC.fingerprint, SPEC.max_window_s, 600, create=True)
    with pytest.raises(StoreMismatch, match="less than the longest window plus --allowed_lateness_s"):
        prepare_store(short, SPEC.fingerprint, SPEC.max_window_s, 3600, create=False)
    with pytest.raises(StoreMismatch, match="does not exist"):
        prepare_store(parse_table_path("projects/test-project/instances/local/tables/none"), SPEC.fingerprint,
                      SPEC.max_window_s, 3600, create=False)


def test_a_store_outage_gets_503_and_the_service_answers_again_when_it_returns(model_dir, monkeypatch):
    """An emulator of its own, stopped and started again on the same port (its tables are in memory:
    the stream would write them again; here the test does)."""
    port = free_port()
    table = "projects/test-project/instances/local/tables/outage"
    now = int(time.time() * 1e6)
    observations = [_observation("20261206-UA1-EWR", now - 10 * MIN, 10.0)]
    emulator = BigtableEmulator(port).start()
    try:
        for name, value in emulator.env.items():
            monkeypatch.setenv(name, value)
        _fill(table, observations, now)
        service, client = _client(table, model_dir, "--store_timeout_s", "1")
        assert client.post("/v1/predict", json={"instances": [_instance()]}).status_code == 200
        emulator.stop()
        down = client.post("/v1/predict", json={"instances": [_instance()]})
        assert down.status_code == 503 and "did not answer" in down.json()["error"]
        assert client.get("/healthz").status_code == 503
        assert 'online_errors_total{reason="store_unavailable"} 1.0' in client.get("/metrics").text
        emulator = BigtableEmulator(port).start()
        _fill(table, observations, now)

        def answered():
            response = client.post("/v1/predict", json={"instances": [_instance()]})
            return response.status_code == 200 and response.json()
        body = wait_until(answered, 60, "the service to answer again after the store returned")
        assert body["predictions"][0]["features"]["origin_departures_1h"] == 1.0
        assert client.get("/healthz").status_code == 200
    finally:
        emulator.stop()


def test_the_command_refuses_bad_flags_with_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the command quiets TensorFlow; the test leaves it as it was
    for argv, message in ((["--model", "m"], "--online_table"),
                          (["--model", "m", "--online_table", "t", "--prot", "1"], "--port")):
        with pytest.raises(SystemExit) as exited:
            serve.main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        serve.main(["--model", "m", "--online_table", "projects/p/tables/t"])
    assert exited.value.code == 2 and "projects/<project>/instances/<instance>/tables/<table>" in capsys.readouterr().err


def test_the_writer_fills_the_store_from_history_and_marks_its_progress(bigtable_emulator):
    """WriteOnlineStore (the streaming job's step) over a bounded history, as the warm start's
    history goes through it: every observation's cells, and a progress mark at the latest event
    time written, not beyond (the watermark of a bounded input jumps to the end of time)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.utils.timestamp import Timestamp

    from beam_app.online.bigtable_store import OnlineStore
    from beam_app.online.layout import answer, rows_to_read
    from beam_app.online.write import WriteOnlineStore
    from tests.scan_engine import bits
    from tests.test_online_scoring import _batch_answers

    table = "projects/test-project/instances/local/tables/from-history"
    prepare_store(parse_table_path(table), SPEC.fingerprint, SPEC.max_window_s, 3600, create=True)
    t0 = int(time.time() * 1e6) - 3 * 3600 * 10 ** 6
    history = [_observation(f"20261206-UA{i}-EWR", t0 + i * 7 * MIN + i, float(i % 9 - 3),
                            origin=("EWR", "JFK")[i % 2], tailnum=f"N{i % 4}") for i in range(25)]
    requests = [Event(f"20261206-B6{i}-JFK", "request", t0 + i * 11 * MIN + 500,
                      {"carrier": "UA", "origin": ("EWR", "JFK")[i % 2], "dest": "ORD", "tailnum": f"N{i % 4}"})
                for i in range(12)]
    with beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner"])) as pipeline:
        (pipeline
         | beam.Create(history + requests)
         | beam.Map(lambda e: beam.window.TimestampedValue(e, Timestamp(micros=e.time_us)))
         | WriteOnlineStore(SPEC, table))
    store = OnlineStore(parse_table_path(table))
    latest = max(e.time_us for e in history + requests)
    assert store.through_us() == latest
    layout, groups = EventLayout.of(SPEC), feature_groups(SPEC)
    expected = _batch_answers(history + requests)
    for request in requests:
        cells, through = store.read(rows_to_read(layout, groups, request), with_through=True)
        assert through == latest
        assert bits(answer(layout, groups, request, len(SPEC.windowed_features), cells, 3600)) == \
            bits(expected[request.event_id])
