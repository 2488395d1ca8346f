"""Shared test helpers: the flights spec, hand-made events, and the session's
expensive fixtures (batch runs, trained models), each computed once per test
run even with pytest-xdist's workers (`shared_result`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("NO_GCE_CHECK", "true")  # google-auth must not probe a metadata server

from tests.emulators import (_bigtable_process, _pubsub_process, bigquery_emulator, bigtable_emulator,  # noqa: E402, F401
                             pubsub_emulator)
from transforms.events import Event  # noqa: E402
from transforms.spec import load_spec  # noqa: E402

MIN_US = 60_000_000
HOUR_US = 60 * MIN_US


@pytest.fixture(scope="session")
def flights_spec():
    return load_spec("flights")


def shared_directory(tmp_path_factory) -> Path:
    """The directory every worker of this test run sees: the run's base temporary
    directory (under pytest-xdist, the parent of each worker's own)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    shared = base / "shared"
    shared.mkdir(exist_ok=True)
    return shared


def shared_result(tmp_path_factory, name: str, compute: Callable[[Path], dict]) -> tuple[Path, dict]:
    """`compute(directory)` once per test run, by whichever worker asks first, under a
    file lock; the others wait for it and read its JSON result (paths as strings)
    from disk. Returns (directory, result). A failure is recorded too: the other
    workers fail with its message rather than computing it again."""
    from filelock import FileLock

    shared = shared_directory(tmp_path_factory)
    directory, done = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            if directory.exists():  # left half-written by a worker that died
                shutil.rmtree(directory)
            directory.mkdir()
            try:
                result = compute(directory)
            except Exception as err:
                done.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
                raise
            done.write_text(json.dumps({"result": result}))
        recorded = json.loads(done.read_text())
    if "error" in recorded:
        pytest.fail(f"the shared fixture {name} failed in another worker: {recorded['error']}", pytrace=False)
    return directory, recorded["result"]


# About how long the slowest tests take (seconds, one worker of two, their fixtures already made; measured
# 2026-12-06), for the order below; a test missing here counts as short. Stale numbers cost time, never a result.
EXPECTED_SECONDS = {
    "tests/test_loop_e2e.py::test_the_loop_serves_archives_retrains_and_reloads": 130,
    "tests/test_online_e2e.py::test_online_answers_equal_batch_scoring_of_the_same_history": 80,
    "tests/test_streaming_e2e.py::test_published_events_get_exactly_one_prediction_each_equal_to_batch": 55,
    "tests/test_streaming_e2e.py::test_two_kinds_of_observation_on_one_topic": 60,
    "tests/test_model_swap_e2e.py::test_a_new_version_takes_over_without_restart_and_one_of_another_spec_is_refused": 50,
    "tests/test_restart_e2e.py::test_a_restarted_job_with_bootstrap_answers_its_first_requests_as_batch_does": 45,
    "tests/test_crash_e2e.py::test_a_job_killed_mid_stream_and_restarted_loses_no_request_in_silence": 65,
    "tests/test_streaming_e2e.py::test_taxi_events_stream_through_the_same_job": 25,
    "tests/test_train.py::test_serving_signature_equals_model_predict_on_the_batch_bytes": 15,
    "tests/test_templates.py::test_template_main_runs_the_streaming_job_on_the_emulators": 15,
    "tests/test_train.py::test_rerun_resumes_from_the_last_epoch": 10,
    "tests/test_train.py::test_warm_start_continues_the_latest_version": 11,
    "tests/test_train.py::test_warm_start_keeps_the_version_when_training_makes_eval_worse": 10,
    "tests/test_deduplicate.py::test_features_of_a_stream_delivered_twice_equal_batch_features_of_the_clean_events": 10,
    "tests/test_deploy.py::test_training_writes_every_file_of_a_remote_model_dir_through_gfile": 10,
    "tests/test_windowed_features.py::test_streaming_path_equals_batch_path_bit_for_bit": 7,
    "tests/test_state_ends.py::test_ten_thousand_keys_seen_once_leave_no_state_on_the_fnapi_runner": 8,
    "tests/test_state_ends.py::test_ten_thousand_keys_seen_once_leave_no_state_on_the_test_stream[a_state_per_key]": 8,
    "tests/test_feature_parity.py::test_every_aggregate_streams_as_it_batches": 6,
    "tests/test_streaming.py::test_a_model_trained_on_another_spec_refuses_to_start": 7,
    "tests/test_model.py::test_a_short_training_run_lowers_the_loss": 6,
    "tests/test_consistency.py::test_consistency_over_files_counts_every_feature_and_lists_the_unexplained": 6,
    "tests/test_train.py::test_warm_start_refuses_a_version_of_another_spec": 6,
    "tests/test_deploy.py::test_every_gcloud_flag_exists_in_the_installed_cli": 5,
    "tests/test_reference_sql.py::test_real_data_slice": 5,
}
HEAVY_S = 3.0  # tests at least this long are placed one by one; the rest go by module


def _expected_seconds(item) -> float:
    return EXPECTED_SECONDS.get(item.nodeid, EXPECTED_SECONDS.get(item.nodeid.split("[")[0], 0.3))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: -n 2 --dist worksteal), the order that balances the workers:
    worksteal hands each worker a contiguous share of the collected tests (equal counts) and lets an
    idle worker take the second half of another's queue. So each share starts with its longest tests
    (the longest first, spread so that the shares' expected times are even), then short tests module by
    module (a module's fixtures made once): the tests another worker may take come last."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and len(items) > workers:
        items[:] = _spread(items, workers)


def _spread(items: list, workers: int) -> list:
    sizes, left = [], len(items)
    for index in range(workers):  # what worksteal gives each worker at the start, in order
        sizes.append(left // (workers - index))
        left -= sizes[-1]
    shares: list[list] = [[] for _ in range(workers)]
    seconds = [0.0] * workers

    def place(group: list, weight: float) -> None:
        share = min(range(workers), key=lambda i: seconds[i])
        shares[share].extend(group)
        seconds[share] += weight

    heavy = sorted((item for item in items if _expected_seconds(item) >= HEAVY_S), key=_expected_seconds, reverse=True)
    for item in heavy:
        place([item], _expected_seconds(item))
    modules: dict[str, list] = {}
    for item in items:
        if _expected_seconds(item) < HEAVY_S:
            modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    for group in sorted(modules.values(), key=lambda group: -sum(map(_expected_seconds, group))):
        place(group, sum(map(_expected_seconds, group)))
    # Equal counts, as worksteal splits by count: the last (short) tests of a longer share move over.
    for index in range(workers):
        for other in range(workers):
            while len(shares[index]) > sizes[index] and len(shares[other]) < sizes[other]:
                shares[other].append(shares[index].pop())
    return [item for share in shares for item in share]


# What TensorFlow's first import sets in os.environ (2.21): not a test's doing, and TensorFlow needs them kept.
TENSORFLOW_IMPORT_SETS = {"TF2_BEHAVIOR", "HDF5_PLUGIN_PATH", "TPU_ML_PLATFORM", "TPU_ML_PLATFORM_VERSION",
                          "ENABLE_RUNTIME_UPTIME_TELEMETRY"}


@pytest.fixture(autouse=True)
def _no_environment_leak(request):
    """A test leaves os.environ as it found it (monkeypatch.setenv for what a test needs):
    a variable left behind (PUBSUB_EMULATOR_HOST, say) would change what the next one tests."""
    import sys

    before = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}  # pytest's own
    tensorflow_before = "tensorflow" in sys.modules
    yield
    after = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}
    if not tensorflow_before and "tensorflow" in sys.modules:  # imported by this test, for the first time
        after = {name: value for name, value in after.items() if name in before or name not in TENSORFLOW_IMPORT_SETS}
    if after != before:
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        for name in changed:
            if name in before:
                os.environ[name] = before[name]
            else:
                os.environ.pop(name, None)
        pytest.fail(f"{request.node.nodeid} changed the environment: {changed}", pytrace=False)


def request(event_id: str, time_us: int, origin: str = "EWR", carrier: str = "UA", label=None, dest: str = "ORD",
            tailnum=None) -> Event:
    """A flights request as the parser gives it (every field, None where missing)."""
    return Event(event_id, "request", time_us, {
        "carrier": carrier, "origin": origin, "dest": dest, "distance": 719.0, "hour": 8,
        "minute": 0, "month": 1, "day_of_week": 1, "tailnum": tailnum, "dep_delay": label})


def observation(event_id: str, time_us: int, delay: float, origin: str = "EWR", carrier: str = "UA",
                dest: str = "ORD", tailnum=None) -> Event:
    """A flights departure as the parser gives it (every field, None where missing)."""
    return Event(event_id, "observation", time_us, {"carrier": carrier, "origin": origin, "dest": dest,
                                                    "tailnum": tailnum, "dep_delay": delay})


# The slice the end-to-end and model tests share: days on both sides of the
# eval and test boundaries (and of midnight UTC).
DAYS = {(10, 31), (11, 1), (11, 30), (12, 1)}
WEATHER_DAYS = DAYS | {(10, 30), (11, 29)}  # the weather before each slice day's first requests too
BAD_ROWS = {
    "2013,11,1,600,600,3,900,900,1,UA,9999,N1,BOS,ORD,100,700,6,0,2013-11-01T11:00:00Z": "origin: unknown value",
    "2013,11,1,600,600,soon,900,900,1,UA,9998,N1,EWR,ORD,100,700,6,0,2013-11-01T11:00:00Z": "dep_delay: not a number",
    "2013,11,1,600,600,3,900": "expected 19 CSV columns",
}


def _run_flights_batch(root: Path) -> dict:
    from beam_app import batch
    from tests.flights_slice import flights_lines

    lines = flights_lines(lambda month, day: (month, day) in DAYS)
    (root / "good.csv").write_text("\n".join(lines) + "\n")
    with_bad = root / "flights.csv"
    with_bad.write_text("\n".join(lines + list(BAD_ROWS)) + "\n")
    summary = batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1",
                         "--input", str(with_bad), "--output", str(root / "out")])
    return {"rows": len(lines) - 1, "summary": summary}


@pytest.fixture(scope="session")
def flights_batch(tmp_path_factory):
    """beam_app.batch run once on the slice (bad rows mixed in): its inputs, output and summary."""
    root, result = shared_result(tmp_path_factory, "flights_batch", _run_flights_batch)
    return {"rows": result["rows"], "good_csv": root / "good.csv", "output": root / "out",
            "summary": result["summary"]}


def _run_flights_weather_batch(root: Path) -> dict:
    from beam_app import batch
    from tests.flights_slice import flights_lines, weather_lines

    flights = root / "flights.csv"
    flights.write_text("\n".join(flights_lines(lambda month, day: (month, day) in DAYS)) + "\n")
    weather = root / "weather.csv"
    weather.write_text("\n".join(weather_lines(lambda month, day: (month, day) in WEATHER_DAYS)) + "\n")
    return {"summary": batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", "flights_weather",
                                  "--input", f"flights={flights}", "--input", f"weather={weather}",
                                  "--output", str(root / "out")])}


@pytest.fixture(scope="session")
def flights_weather_batch(tmp_path_factory):
    """beam_app.batch with the flights_weather spec on the same slice plus the
    weather of those days (and the hours before midnight of the day before):
    its inputs, output and summary."""
    root, result = shared_result(tmp_path_factory, "flights_weather_batch", _run_flights_weather_batch)
    return {"flights_csv": root / "flights.csv", "weather_csv": root / "weather.csv", "output": root / "out",
            "summary": result["summary"]}


def _run_taxi_batch(root: Path) -> dict:
    from beam_app import batch

    return {"summary": batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", "chicago_taxi",
                                  "--output", str(root / "out")])}


@pytest.fixture(scope="session")
def taxi_batch(tmp_path_factory):
    """beam_app.batch run once on the chicago_taxi spec's embedded data (all 15,002 trips): its output and summary."""
    root, result = shared_result(tmp_path_factory, "taxi_batch", _run_taxi_batch)
    return {"output": root / "out", "summary": result["summary"]}


def read_examples(output, split, feature_spec) -> dict:
    """A split the batch job wrote: {event_id: {column: value}}, parsed with feature_spec."""
    import tensorflow as tf

    files = sorted(str(p) for p in (output / split).glob("examples-*.tfrecord.gz"))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(1024).map(
        lambda serialized: tf.io.parse_example(serialized, feature_spec))
    examples = {}
    for batch_ in dataset:
        columns = {name: tensor.numpy() for name, tensor in batch_.items()}
        for i, event_id in enumerate(columns["event_id"]):
            assert event_id.decode() not in examples, event_id  # event ids are unique
            examples[event_id.decode()] = {name: values[i] for name, values in columns.items()}
    return examples


# Training parameters small enough for tests: a few seconds on the slice.
SMALL_TRAINING = dict(epochs=2, batch_size=256, hidden_units=(32, 16), shuffle_buffer=2000, adapt_examples=2000,
                      baseline_model=False)


def _small_model(tmp_path_factory, name: str, data_dir: Path):
    """A small model trained on data_dir, once per test run: (train.Params, its version directory).
    Tests read it and copy it; none writes into its model directory (its LATEST must stay)."""
    from models import train

    def params(model_dir: Path) -> train.Params:
        return train.Params(data_dir=str(data_dir), model_dir=str(model_dir), **SMALL_TRAINING)

    model_dir, result = shared_result(tmp_path_factory, name,
                                      lambda directory: {"version": train.run(params(directory)).name})
    return params(model_dir), model_dir / result["version"]


@pytest.fixture(scope="session")
def trained_model(flights_batch, tmp_path_factory):
    """A small model trained on the slice: (train.Params, its version directory)."""
    return _small_model(tmp_path_factory, "trained_model", flights_batch["output"])


@pytest.fixture(scope="session")
def flights_weather_model(flights_weather_batch, tmp_path_factory):
    """A small model trained on the flights_weather slice: (train.Params, its version directory)."""
    return _small_model(tmp_path_factory, "flights_weather_model", flights_weather_batch["output"])


@pytest.fixture(scope="session")
def taxi_model(taxi_batch, tmp_path_factory):
    """A small model trained on the taxi batch output: (train.Params, its version directory)."""
    return _small_model(tmp_path_factory, "taxi_model", taxi_batch["output"])
