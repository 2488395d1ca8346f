"""Training, resume and export on the batch job's real output (a 4-day slice)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from models.features import model_inputs, training_spec
from tests.conftest import SMALL_TRAINING as SMALL

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from models import train  # noqa: E402
from models.data import split_files  # noqa: E402
from models.export import SpecMismatch, check_model_spec, export_saved_model  # noqa: E402
from transforms.examples import parse_feature_spec  # noqa: E402
from transforms.spec import spec_from_dict  # noqa: E402


@pytest.mark.slow
def test_run_writes_a_versioned_export_with_its_metrics(trained_model):
    params, version_dir = trained_model
    model_dir = version_dir.parent
    assert (model_dir / "LATEST").read_text().strip() == version_dir.name
    metrics = json.loads((version_dir / "metrics.json").read_text())
    for name in ("model", "median_of_train"):
        for split in ("eval", "test"):
            assert 0 < metrics[name][split]["mae"] <= metrics[name][split]["rmse"]
    # The metrics are the model's real errors: recompute them from its own predictions.
    spec = training_spec(params.data_dir)
    loaded = tf.saved_model.load(str(version_dir / "saved_model"))
    errors = []
    for records in tf.data.TFRecordDataset(split_files(params.data_dir, "test"), compression_type="GZIP").batch(512):
        predictions = loaded.signatures["serving_default"](examples=records)["prediction"].numpy()
        labels = tf.io.parse_example(records, parse_feature_spec(spec))["dep_delay"].numpy()
        errors.append(predictions.astype("float64") - labels)
    errors = np.concatenate(errors)
    assert metrics["model"]["test"]["mae"] == pytest.approx(np.abs(errors).mean(), rel=1e-5)
    assert metrics["model"]["test"]["rmse"] == pytest.approx(np.sqrt(np.square(errors).mean()), rel=1e-5)
    assert json.loads((version_dir / "params.json").read_text())["hidden_units"] == [32, 16]
    written = json.loads((version_dir / "spec.json").read_text())
    assert written["fingerprint"] == training_spec(params.data_dir).fingerprint
    assert list((model_dir / "work" / "model" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard


@pytest.mark.slow
def test_serving_signature_equals_model_predict_on_the_batch_bytes(flights_batch, tmp_path):
    params = train.Params(data_dir=str(flights_batch["output"]), model_dir=str(tmp_path), **SMALL)
    spec = training_spec(params.data_dir)
    inputs = model_inputs(spec)
    model, _ = train.fit(params, spec, inputs, tmp_path / "work", 0.0)
    export_saved_model(model, spec, inputs, tmp_path / "saved_model")
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))

    # The bytes the batch job wrote (their label is simply not read).
    serialized = [record.numpy() for record in
                  tf.data.TFRecordDataset(split_files(params.data_dir, "test"), compression_type="GZIP").take(500)]
    served = loaded.signatures["serving_default"](examples=tf.constant(serialized))["prediction"].numpy()
    parse_spec = {name: f for name, f in parse_feature_spec(spec).items() if name in inputs.names}
    features = tf.io.parse_example(serialized, parse_spec)
    expected = model.predict(features, verbose=0)
    assert served.shape == (500,) and served.std() > 0
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-4)
    raw = loaded.signatures["serve_features"](**features)["prediction"].numpy()
    np.testing.assert_allclose(raw, served, rtol=1e-6)


@pytest.mark.slow
def test_model_from_another_spec_is_refused(trained_model):
    params, version_dir = trained_model
    spec = training_spec(params.data_dir)
    loaded = tf.saved_model.load(str(version_dir / "saved_model"))
    check_model_spec(loaded, spec)  # the right spec passes
    document = spec.to_document()
    document["windowed_features"][0]["window"] = "2h"
    with pytest.raises(SpecMismatch, match="retrain"):
        check_model_spec(loaded, spec_from_dict(document))


class _Crash(keras.callbacks.Callback):
    """Test double for a fault we cannot cause otherwise: the process dying
    after the first epoch (its checkpoint is already written)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.weights_at_crash = [w.copy() for w in self.model.get_weights()]
            raise RuntimeError("simulated crash")


class _Record(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights_at_start = [w.copy() for w in self.model.get_weights()]
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.mark.slow
def test_rerun_resumes_from_the_last_epoch(flights_batch, tmp_path):
    # Without the weights' moving average: with it (the default), the weights restored after an interruption
    # are not bit for bit those at the interruption (noted in the README), which this test would not tell apart.
    params = train.Params(data_dir=str(flights_batch["output"]), model_dir=str(tmp_path),
                          **{**SMALL, "epochs": 3, "ema_momentum": 0.0})
    spec = training_spec(params.data_dir)
    inputs = model_inputs(spec)
    crash = _Crash()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.fit(params, spec, inputs, tmp_path / "work", 0.0, [crash])
    record = _Record()
    _, history = train.fit(params, spec, inputs, tmp_path / "work", 0.0, [record])
    assert record.epochs == [1, 2]  # epoch 0 is not trained again
    assert len(history.history["loss"]) == 2
    for restored, saved in zip(record.weights_at_start, crash.weights_at_crash):
        np.testing.assert_array_equal(restored, saved)


def test_bad_flags_say_what_is_wrong(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--hidden_units", "64,x"])
    assert "--hidden_units" in capsys.readouterr().err
    assert train.parse_args(["--data_dir", "d"]).model_dir.endswith("d/model")
    assert dataclasses.asdict(train.parse_args([]))["loss"] == "mae"


def _model_dir_with(version_dir, root):
    """A model directory of its own holding a copy of version_dir, LATEST naming it: a warm start
    writes there without moving the session fixture's LATEST."""
    import shutil

    model_dir = root / "models"
    shutil.copytree(version_dir, model_dir / version_dir.name)
    (model_dir / "LATEST").write_text(version_dir.name + "\n")
    return model_dir


class _FirstPredictions(keras.callbacks.Callback):
    """The model's predictions on `features` when training begins, before any step."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def on_train_begin(self, logs=None):
        self.predictions = self.model(self.features, training=False).numpy()


def _served(saved_model, records):
    return tf.saved_model.load(str(saved_model)).signatures["serving_default"](
        examples=tf.constant(records))["prediction"].numpy()


@pytest.mark.slow
def test_warm_start_continues_the_latest_version(trained_model, tmp_path):
    old_params, old_version = trained_model
    model_dir = _model_dir_with(old_version, tmp_path)
    data_dir = old_params.data_dir
    spec = training_spec(data_dir)
    records = [record.numpy() for record in
               tf.data.TFRecordDataset(split_files(data_dir, "eval"), compression_type="GZIP").take(300)]
    inputs = model_inputs(spec)
    parse_spec = {name: f for name, f in parse_feature_spec(spec).items() if name in inputs.names}
    first = _FirstPredictions(tf.io.parse_example(records, parse_spec))
    # Another architecture asked for: the version's is kept (its weights fit no other).
    params = train.Params(data_dir=data_dir, model_dir=str(model_dir), warm_start_from=str(model_dir),
                          **{**SMALL, "epochs": 1, "learning_rate": 0.0005, "hidden_units": (8,)})
    version_dir = train.run(params, extra_callbacks=[first])

    # The weights were loaded: before any step the model predicts what the old version serves.
    np.testing.assert_allclose(first.predictions, _served(old_version / "saved_model", records), rtol=1e-5,
                               atol=1e-4)
    assert (model_dir / "LATEST").read_text().strip() == version_dir.name != old_version.name
    assert version_dir.parent == model_dir and (version_dir / train.KERAS_MODEL).exists()
    metrics = json.loads((version_dir / "metrics.json").read_text())
    old_metrics = json.loads((old_version / "metrics.json").read_text())
    assert metrics["warm_start_from"] == {"version": old_version.name, "path": str(model_dir / old_version.name)}
    # The same splits, so the old version's own errors.
    for split in ("eval", "test"):
        assert metrics["before_warm_start"][split]["mae"] == pytest.approx(old_metrics["model"][split]["mae"],
                                                                           rel=1e-5)
    # Early stopping counts the version continued: the new one is no worse on eval (float32 sums apart).
    assert metrics["model"]["eval"]["mae"] <= metrics["before_warm_start"]["eval"]["mae"] + 1e-3
    assert metrics["epochs_run"] == 1 and "without_windowed_features" not in metrics
    written = json.loads((version_dir / "params.json").read_text())
    assert written["warm_start_from"] == str(model_dir / old_version.name)
    assert written["hidden_units"] == [32, 16] and written["learning_rate"] == 0.0005
    assert not written["baseline_model"]
    served = _served(version_dir / "saved_model", records)
    assert served.shape == (300,) and np.isfinite(served).all()


@pytest.mark.slow
def test_warm_start_keeps_the_version_when_training_makes_eval_worse(trained_model, tmp_path):
    old_params, old_version = trained_model
    model_dir = _model_dir_with(old_version, tmp_path)
    # A rate that wrecks the weights in a step: no epoch beats the version continued.
    params = train.Params(data_dir=old_params.data_dir, model_dir=str(model_dir), warm_start_from=str(model_dir),
                          **{**SMALL, "epochs": 1, "learning_rate": 50.0, "ema_momentum": 0.0})
    version_dir = train.run(params)
    records = [record.numpy() for record in tf.data.TFRecordDataset(
        split_files(old_params.data_dir, "test"), compression_type="GZIP").take(300)]
    np.testing.assert_allclose(_served(version_dir / "saved_model", records),
                               _served(old_version / "saved_model", records), rtol=1e-6)
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert metrics["model"]["test"]["mae"] == pytest.approx(metrics["before_warm_start"]["test"]["mae"], rel=1e-6)


@pytest.mark.slow
def test_warm_start_refuses_a_version_of_another_spec(trained_model, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    old_params, old_version = trained_model
    model_dir = _model_dir_with(old_version, tmp_path)
    # The version as if trained on a spec with another window: its spec.json says so.
    written = json.loads((model_dir / old_version.name / "spec.json").read_text())
    written["spec"]["windowed_features"][0]["window"] = "2h"
    other = spec_from_dict(written["spec"])
    written["fingerprint"] = other.fingerprint
    (model_dir / old_version.name / "spec.json").write_text(json.dumps(written))
    before = sorted(path.name for path in model_dir.iterdir())

    completed = subprocess.run(
        [sys.executable, "-m", "models.train", "--data_dir", old_params.data_dir, "--warm_start_from", str(model_dir)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    error = completed.stderr.strip().splitlines()[-1]
    assert completed.returncode == 2  # a usage error: the flag names a model of another spec
    assert error.startswith("python -m models.train: error: --warm_start_from") and other.fingerprint[:12] in error
    assert training_spec(old_params.data_dir).fingerprint[:12] in error and "Train from scratch" in error
    assert sorted(path.name for path in model_dir.iterdir()) == before  # nothing written, LATEST unmoved
    assert (model_dir / "LATEST").read_text().strip() == old_version.name


@pytest.mark.slow
def test_warm_start_flags_come_from_the_version(trained_model, tmp_path, capsys):
    old_params, old_version = trained_model
    model_dir = _model_dir_with(old_version, tmp_path)
    version_dir = model_dir / old_version.name
    base = ["--data_dir", "new_data", "--warm_start_from"]

    params = train.parse_args([*base, str(model_dir)])
    assert (params.hidden_units, params.batch_size, params.shuffle_buffer) == ((32, 16), 256, 2000)  # the version's
    assert (params.learning_rate, params.epochs) == (train.WARM_LEARNING_RATE, train.WARM_EPOCHS)
    assert params.model_dir == str(model_dir) and not params.baseline_model
    # The version directory or its saved_model: the same version, the same model directory.
    for path in (version_dir, version_dir / "saved_model"):
        assert train.locate_warm_start(str(path)).version_dir == str(version_dir)
        assert train.parse_args([*base, str(path)]).model_dir == str(model_dir)
    given = train.parse_args([*base, str(model_dir), "--learning_rate", "0.01", "--batch_size", "128",
                              "--hidden_units", "32,16", "--model_dir", str(tmp_path / "elsewhere")])
    assert (given.learning_rate, given.batch_size, given.model_dir) == (0.01, 128, str(tmp_path / "elsewhere"))

    with pytest.raises(SystemExit):
        train.parse_args([*base, str(model_dir), "--hidden_units", "64"])
    assert "--hidden_units 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args([*base, str(tmp_path / "nothing")])
    assert "neither a model directory" in capsys.readouterr().err
    (version_dir / train.KERAS_MODEL).unlink()  # as a version exported before warm starts
    with pytest.raises(SystemExit):
        train.parse_args([*base, str(model_dir)])
    assert "train once from scratch" in capsys.readouterr().err
