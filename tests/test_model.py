"""The model's inputs, input pipeline and architecture, on the batch job's real output."""

import math

import numpy as np
import pytest

from models.features import model_inputs, training_spec

tf = pytest.importorskip("tensorflow")
from models.data import example_dataset  # noqa: E402
from models.model import build_model, sample_features  # noqa: E402


def test_flights_model_inputs(flights_spec):
    inputs = model_inputs(flights_spec)
    assert inputs.categorical == ("carrier", "origin", "dest")
    assert inputs.numeric == ("distance",)
    assert inputs.ordinal == {"hour": (0, 23), "minute": (0, 59), "month": (1, 12), "day_of_week": (0, 6)}
    assert ("origin", "hour") in inputs.crosses and ("carrier", "day_of_week") in inputs.crosses
    # 11 windowed features: the last_k one is a sequence, the 10 others scalars; every one but the count has a
    # presence flag (the last_k one too: its key, the tail number, is optional on requests).
    assert len(inputs.windowed) == 10 and "tailnum_dep_delay_last3_24h" not in inputs.windowed
    assert inputs.sequences == (("tailnum_dep_delay_last3_24h", "tailnum_dep_delay_last3_24h_length", 3),)
    assert len(inputs.presence) == 10 and "origin_departures_1h_present" not in inputs.presence
    assert "tailnum_dep_delay_last3_24h_present" in inputs.presence and inputs.label == "dep_delay"
    assert inputs.log_scaled == ("origin_departures_1h", "tailnum_seconds_since_last_24h")
    assert {"hour", "month", "distance", "carrier", "tailnum_dep_delay_last3_24h_length"} <= set(inputs.names)
    # The tail number keys features but is no model input: not embedded, not crossed.
    assert "tailnum" not in inputs.names and not any("tailnum" in cross for cross in inputs.crosses)
    assert ("dest", "hour") in inputs.crosses and {key for key, _ in inputs.crosses} == {"origin", "carrier", "dest"}
    without = model_inputs(flights_spec, use_windowed=False)
    assert without.windowed == () and without.presence == () and without.sequences == ()
    assert not any("1h" in name or "3h" in name for name in without.names)


def test_dataset_reads_every_example_once_in_batches(flights_batch):
    data_dir = str(flights_batch["output"])
    spec = training_spec(data_dir)
    dataset = example_dataset(data_dir, "train", spec, batch_size=256, shuffle=True, shuffle_buffer=1000, seed=1)
    ids, sizes = [], []
    for features, label in dataset:
        assert label.dtype == tf.float32 and "dep_delay" not in features
        ids.extend(features["event_id"].numpy().tolist())
        sizes.append(len(label))
    assert len(ids) == len(set(ids)) == flights_batch["summary"]["examples"]["train"]
    assert max(sizes) == 256


def test_missing_split_says_to_run_the_batch_job(flights_spec, tmp_path):
    with pytest.raises(FileNotFoundError, match="beam_app.batch"):
        example_dataset(str(tmp_path), "train", flights_spec, batch_size=8)


@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss(flights_batch):
    import keras

    keras.utils.set_random_seed(3)
    data_dir = str(flights_batch["output"])
    spec = training_spec(data_dir)
    inputs = model_inputs(spec)
    train = example_dataset(data_dir, "train", spec, batch_size=128, shuffle=True, seed=3, features=inputs.names)
    sample = sample_features(train, max_examples=5000)
    model = build_model(inputs, spec, sample, hidden_units=(32, 16), label_offset=0.0)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mae")
    before = model.evaluate(train, verbose=0)
    losses = model.fit(train, epochs=5, verbose=0).history["loss"]
    after = model.evaluate(train, verbose=0)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and after < before * 0.95, (before, losses, after)
    features, _ = next(iter(train))
    predictions = model.predict(features, verbose=0)
    assert predictions.shape == (len(features["origin"]),) and np.isfinite(predictions).all()
