"""Shared test helpers: the flights spec and hand-made events."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_GCE_CHECK", "true")  # google-auth must not probe a metadata server

from tests.emulators import bigquery_emulator, pubsub_emulator  # noqa: E402, F401
from transforms.events import Event  # noqa: E402
from transforms.spec import load_spec  # noqa: E402

MIN_US = 60_000_000
HOUR_US = 60 * MIN_US


@pytest.fixture(scope="session")
def flights_spec():
    return load_spec("flights")


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


@pytest.fixture(scope="session")
def flights_batch(tmp_path_factory):
    """beam_app.batch run once on the slice (bad rows mixed in): its inputs, output and summary."""
    from beam_app import batch
    from tests.flights_slice import flights_lines

    root = tmp_path_factory.mktemp("batch")
    lines = flights_lines(lambda month, day: (month, day) in DAYS)
    good = root / "good.csv"
    good.write_text("\n".join(lines) + "\n")
    with_bad = root / "flights.csv"
    with_bad.write_text("\n".join(lines + list(BAD_ROWS)) + "\n")
    output = root / "out"
    summary = batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1",
                         "--input", str(with_bad), "--output", str(output)])
    return {"rows": len(lines) - 1, "good_csv": good, "output": output, "summary": summary}


@pytest.fixture(scope="session")
def flights_weather_batch(tmp_path_factory):
    """beam_app.batch with the flights_weather spec on the same slice plus the
    weather of those days (and the hours before midnight of the day before):
    its inputs, output and summary."""
    from beam_app import batch
    from tests.flights_slice import flights_lines, weather_lines

    root = tmp_path_factory.mktemp("batch_weather")
    flights = root / "flights.csv"
    flights.write_text("\n".join(flights_lines(lambda month, day: (month, day) in DAYS)) + "\n")
    weather = root / "weather.csv"
    weather.write_text("\n".join(weather_lines(lambda month, day: (month, day) in WEATHER_DAYS)) + "\n")
    output = root / "out"
    summary = batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", "flights_weather",
                         "--input", f"flights={flights}", "--input", f"weather={weather}", "--output", str(output)])
    return {"flights_csv": flights, "weather_csv": weather, "output": output, "summary": summary}


@pytest.fixture(scope="session")
def taxi_batch(tmp_path_factory):
    """beam_app.batch run once on the chicago_taxi spec's embedded data (all 15,002 trips): its output and summary."""
    from beam_app import batch

    output = tmp_path_factory.mktemp("taxi") / "out"
    summary = batch.run(["--runner", "DirectRunner", "--direct_num_workers", "1", "--spec", "chicago_taxi",
                         "--output", str(output)])
    return {"output": output, "summary": summary}


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


@pytest.fixture(scope="session")
def trained_model(flights_batch, tmp_path_factory):
    """A small model trained on the slice: (train.Params, its version directory)."""
    from models import train

    params = train.Params(data_dir=str(flights_batch["output"]), model_dir=str(tmp_path_factory.mktemp("model")),
                          **SMALL_TRAINING)
    return params, train.run(params)


@pytest.fixture(scope="session")
def flights_weather_model(flights_weather_batch, tmp_path_factory):
    """A small model trained on the flights_weather slice: (train.Params, its version directory)."""
    from models import train

    params = train.Params(data_dir=str(flights_weather_batch["output"]),
                          model_dir=str(tmp_path_factory.mktemp("weather_model")), **SMALL_TRAINING)
    return params, train.run(params)


@pytest.fixture(scope="session")
def taxi_model(taxi_batch, tmp_path_factory):
    """A small model trained on the taxi batch output: (train.Params, its version directory)."""
    from models import train

    params = train.Params(data_dir=str(taxi_batch["output"]), model_dir=str(tmp_path_factory.mktemp("taxi_model")),
                          **SMALL_TRAINING)
    return params, train.run(params)
