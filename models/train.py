"""Training: the batch job's TFRecords -> a versioned SavedModel that serves tf.Examples.

    python -m models.train --data_dir output

reads output/{train,eval}/ and output/spec.json, trains the wide-and-deep
model (early stopping on eval), trains the same model without the windowed
features as a baseline, evaluates both on eval and test against the median
of train (and, when the spec names `evaluation.rate_baseline`, against
label = rate x that field, the rate fitted on train), and writes

    <model_dir>/<UTC timestamp>/saved_model/   serving_default: serialized tf.Example -> prediction
    <model_dir>/<UTC timestamp>/metrics.json   MAE and RMSE on eval and test, with the baselines
    <model_dir>/<UTC timestamp>/params.json    the settings of this run
    <model_dir>/<UTC timestamp>/spec.json      the feature spec and its fingerprint
    <model_dir>/<UTC timestamp>/keras_model.keras  the trainable model, for --warm_start_from
    <model_dir>/<UTC timestamp>/stats.json     the batch job's training statistics (also in
                                               saved_model/assets.extra/), when the data dir has them
    <model_dir>/LATEST                         the name of the newest version
    <model_dir>/work/                          checkpoints each epoch, TensorBoard logs

--model_dir may be local or a gs:// directory: everything under it is written
through tf.io.gfile (LATEST last, so readers never see a half-written version). --data_dir
is read locally. Re-run with the same --model_dir after an interruption and
training resumes from the last completed epoch. `tensorboard --logdir <model_dir>/work`.

Each version also holds keras_model.keras, the trainable Keras model (the
SavedModel's serving signatures cannot be trained), for incremental training:

    python -m models.train --data_dir new_output --warm_start_from output/model

continues the latest version of output/model (or the version directory
given) on the batch job's output for new data, and exports a new version in
the same model directory by default: LATEST moves on, and a streaming job
watching it picks the version up. It refuses a version trained on another
spec than the one the new data was written with. The version's preprocessing
is kept, not refitted: its vocabularies, quantile bins and normalizations
define what the weights mean (a refitted vocabulary would hand an embedding
row to another airport, refitted bins and means would shift every input under
weights fitted to the old ones), and values it never saw fall in the
out-of-vocabulary bucket, as at serving time. So the architecture and the
preprocessing settings (--hidden_units ... --adapt_examples) are the
version's (another value on the command line is refused), the other settings
the version's unless given, and the learning rate and epochs have defaults
of their own (a quarter of the rate, half the epochs: measured by
bench/warm_start_bench.py, see WARM_LEARNING_RATE). Early stopping on eval
counts the version itself as the epoch before the first: when no epoch
beats it on eval, the new version keeps its weights. The baseline without windowed features is not retrained (nor
reported) on a warm start; metrics.json records the version continued
(`warm_start_from`) and its errors on the new eval and test splits
(`before_warm_start`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import posixpath
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from models.features import ModelInputs, model_inputs, training_spec, unseen_later
from transforms.command_line import ArgumentParser, quiet_tensorflow
from transforms.spec import FeatureSpec, presence_name

ADAPT_SEED = 0  # the preprocessing sample must be the same on a resumed run
LR_FLOOR = 0.05  # --lr_schedule cosine ends at this share of the learning rate
KERAS_MODEL = "keras_model.keras"  # the trainable model in each version directory, what a warm start loads
# A warm start's defaults, chosen on eval MAE (bench/warm_start_bench.py: v1 trained on Jan..Sep, eval 10.869,
# warm-started on October, eval November): rate 0.0005 x 4 epochs 10.859, x 8 10.864, 0.0002 x 4 10.862; at
# 0.001 and 0.002 no epoch beat v1, which early stopping then kept (10.869). From scratch on Jan..Oct: 10.851.
WARM_LEARNING_RATE = 0.0005
WARM_EPOCHS = 4
# The settings that make the model what it is: a warm start takes the version's.
ARCHITECTURE = ("hidden_units", "embedding_dim", "cross_bins", "sequence_units", "numeric_bins", "dropout",
                "adapt_examples")
# The settings a warm start takes from the version unless given (beside ARCHITECTURE).
INHERITED = ("batch_size", "lr_schedule", "ema_momentum", "loss", "patience", "shuffle_buffer", "seed")


@dataclasses.dataclass(frozen=True)
class Params:
    data_dir: str
    model_dir: str
    epochs: int = 8
    batch_size: int = 1024
    learning_rate: float = 0.002
    # The defaults below were chosen on eval MAE (flights, 11 features; the table is in the README).
    lr_schedule: str = "cosine"  # or "constant"; cosine decays to LR_FLOOR x learning_rate over the epochs
    ema_momentum: float = 0.99  # > 0: evaluate and export an exponential moving average of the weights
    hidden_units: tuple[int, ...] = (256, 128, 64)
    embedding_dim: int = 8
    cross_bins: int = 1024
    sequence_units: int = 16  # GRU units per last_k feature
    numeric_bins: int = 64  # numbers also as a piecewise-linear encoding over this many quantile bins (0: off)
    dropout: float = 0.1  # after each hidden layer
    loss: str = "mae"
    patience: int = 3
    # The batch job's shards now come in runs of a few months each: a 10,000-example window trains on
    # a few weeks at a time. A window over the whole split (--shuffle_buffer 300000) measured the same
    # eval MAE (10.87), for about 15 s more per model.
    shuffle_buffer: int = 10_000
    adapt_examples: int = 100_000
    seed: int = 42
    baseline_model: bool = True  # also train without the windowed features
    warm_start_from: str | None = None  # a model dir (its LATEST) or version dir to continue; None: from scratch


def is_local(path: str | Path) -> bool:
    """False for URLs such as gs://bucket/dir (or TensorFlow's ram://), which only tf.io.gfile can write."""
    return "://" not in str(path)


def join(path: str | Path, *parts: str) -> str:
    """A path under `path`: pathlib's for a local one, and for a URL the same
    without pathlib, which would turn gs://b into gs:/b."""
    return str(Path(path, *parts)) if is_local(path) else posixpath.join(str(path), *parts)


def write_text(path: str, text: str) -> None:
    """Writes a small file through tf.io.gfile (local or gs://), creating its directory."""
    import tensorflow as tf

    parent = os.path.dirname(path) if is_local(path) else posixpath.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "w") as out:
        out.write(text)


def read_data_stats(data_dir: str | Path) -> str | None:
    """The text of the data dir's stats.json (the batch job's training
    statistics), or None with a warning where it has none (written before
    the batch job computed them, or with --no_stats): the model is still exported."""
    path = Path(data_dir) / "stats.json"
    if not path.exists():
        logging.warning("%s not found: the model is exported without training statistics "
                        "(re-run the batch job without --no_stats to have them)", path)
        return None
    return path.read_text()


def _exists(path: str) -> bool:
    if is_local(path):
        return Path(path).exists()
    import tensorflow as tf

    return tf.io.gfile.exists(path)


def _read_text(path: str) -> str:
    if is_local(path):
        return Path(path).read_text()
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return f.read()


class WarmStartError(ValueError):
    """--warm_start_from names nothing a warm start can continue."""


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The version a warm start continues."""

    model_dir: str  # the model directory it is in: where the new version goes unless --model_dir says otherwise
    version: str
    version_dir: str
    params: dict  # its params.json
    metrics: dict  # its metrics.json

    @property
    def keras_model(self) -> str:
        return join(self.version_dir, KERAS_MODEL)


def locate_warm_start(path: str) -> WarmStart:
    """--warm_start_from (a model directory, whose LATEST names the version;
    a version directory; or its saved_model/) -> the version to continue.
    FileNotFoundError where there is none, WarmStartError where the version
    has no trainable model."""
    path = path.rstrip("/") or "/"
    if posixpath.basename(path) == "saved_model":
        path = posixpath.dirname(path)
    if _exists(join(path, "LATEST")):
        model_dir, version = path, _read_text(join(path, "LATEST")).strip()
        version_dir = join(path, version)
    elif _exists(join(path, "params.json")):
        model_dir, version, version_dir = posixpath.dirname(path) or ".", posixpath.basename(path), path
    else:
        raise FileNotFoundError(f"--warm_start_from {path}: neither a model directory of `python -m models.train` "
                                "(it holds LATEST) nor one of its version directories")
    if not _exists(join(version_dir, KERAS_MODEL)):
        raise WarmStartError(
            f"--warm_start_from {path}: version {version_dir} has no {KERAS_MODEL} (versions trained before warm "
            "starts existed hold only the SavedModel, whose serving signatures cannot be trained): train once from "
            "scratch, then warm-start from that version")
    return WarmStart(model_dir, version, version_dir, json.loads(_read_text(join(version_dir, "params.json"))),
                     json.loads(_read_text(join(version_dir, "metrics.json"))))


def check_warm_start_spec(warm: WarmStart, spec: FeatureSpec, data_dir: str) -> None:
    """SpecMismatch unless the version was trained on the spec the new data was written with."""
    from models.export import SpecMismatch

    trained = json.loads(_read_text(join(warm.version_dir, "spec.json")))
    if trained["fingerprint"] != spec.fingerprint:
        name = trained.get("spec", {}).get("name", "?")
        raise SpecMismatch(
            f"--warm_start_from: version {warm.version_dir} was trained on spec {name!r} {trained['fingerprint'][:12]}, "
            f"but {data_dir} was written with spec {spec.name!r} {spec.fingerprint[:12]}: a warm start continues a "
            "model on data of its own spec. Train from scratch (without --warm_start_from), or rerun the batch job "
            f"with the version's spec (its copy is {join(warm.version_dir, 'spec.json')})")


def parse_args(argv: Sequence[str]) -> Params:
    defaults = Params("", "")
    parser = ArgumentParser(prog="python -m models.train", description=__doc__)
    parser.add_argument("--data_dir", default="./output", help="Output of beam_app.batch (default: ./output).")
    parser.add_argument("--model_dir", default=None,
                        help="Where versions are exported (default: <data_dir>/model; with --warm_start_from, the "
                        "model directory of the version continued).")
    parser.add_argument("--warm_start_from", default=None, metavar="MODEL_DIR",
                        help="Continue training the latest version of this model directory (or this version "
                        "directory) on --data_dir, keeping its preprocessing, instead of training from scratch. "
                        "Refused for a version trained on another spec.")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"Most epochs (early stopping may end sooner; default: {defaults.epochs}, "
                        f"{WARM_EPOCHS} on a warm start).")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning_rate", type=float, default=None,
                        help=f"Adam learning rate (default: {defaults.learning_rate}, {WARM_LEARNING_RATE} on a "
                        "warm start).")
    parser.add_argument("--lr_schedule", choices=("constant", "cosine"), default=defaults.lr_schedule,
                        help="constant, or cosine: decayed to %s x the rate by the last epoch (default: %%(default)s)."
                        % LR_FLOOR)
    parser.add_argument("--ema_momentum", type=float, default=defaults.ema_momentum,
                        help="Above 0: evaluate and export the exponential moving average of the weights "
                        "(e.g. 0.99; default: %(default)s; 0: off).")
    parser.add_argument("--hidden_units", default=",".join(map(str, defaults.hidden_units)),
                        help="Deep part, comma-separated layer sizes (default: %(default)s).")
    parser.add_argument("--embedding_dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--cross_bins", type=int, default=defaults.cross_bins, help="Hash buckets per crossed pair.")
    parser.add_argument("--sequence_units", type=int, default=defaults.sequence_units,
                        help="GRU units of the recurrent branch over each last_k feature.")
    parser.add_argument("--numeric_bins", type=int, default=defaults.numeric_bins,
                        help="Each number also enters as a piecewise-linear encoding over this many quantile bins "
                             "of the training sample (0: off; default: %(default)s).")
    parser.add_argument("--dropout", type=float, default=defaults.dropout,
                        help="Dropout after each hidden layer (default: %(default)s).")
    parser.add_argument("--loss", choices=("mae", "mse", "huber"), default=defaults.loss,
                        help="mae (default) suits delays: a few huge ones should not steer the model.")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="Epochs without a better eval loss before stopping.")
    parser.add_argument("--shuffle_buffer", type=int, default=defaults.shuffle_buffer)
    parser.add_argument("--adapt_examples", type=int, default=defaults.adapt_examples,
                        help="Training examples the vocabularies and normalizers are fitted on.")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no_baseline_model", action="store_true",
                        help="Skip training the model without windowed features (halves the time; never trained "
                        "on a warm start).")
    args = parser.parse_args(argv)
    # Which flags the command line gave (argparse sets no default where the namespace has a value): a warm
    # start takes the version's settings for the others.
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{dest: unset for dest in vars(args)}))
    given = {dest for dest, value in vars(probe).items() if value is not unset}
    try:
        hidden = tuple(int(units) for units in args.hidden_units.split(",") if units.strip())
    except ValueError:
        parser.error(f"--hidden_units: comma-separated integers, got {args.hidden_units!r}")
    settings = {name: getattr(args, name) for name in (*ARCHITECTURE, *INHERITED)}
    def unless_given(value, default):
        return default if value is None else value

    settings.update(hidden_units=hidden, epochs=unless_given(args.epochs, defaults.epochs),
                    learning_rate=unless_given(args.learning_rate, defaults.learning_rate),
                    baseline_model=not args.no_baseline_model)
    model_dir = args.model_dir or join(args.data_dir, "model")
    if args.warm_start_from:
        try:
            warm = locate_warm_start(args.warm_start_from)
        except (FileNotFoundError, WarmStartError) as err:
            parser.error(str(err))
        for name in (*ARCHITECTURE, *INHERITED):
            if name not in warm.params:
                continue
            theirs = tuple(warm.params[name]) if name == "hidden_units" else warm.params[name]
            if name not in given:
                settings[name] = theirs
            elif name in ARCHITECTURE and settings[name] != theirs:
                parser.error(f"--{name} {getattr(args, name)}: a warm start continues version {warm.version_dir}, "
                             f"whose {name} is {warm.params[name]}; leave --{name} out")
        settings.update(epochs=unless_given(args.epochs, WARM_EPOCHS),
                        learning_rate=unless_given(args.learning_rate, WARM_LEARNING_RATE), baseline_model=False)
        model_dir = args.model_dir or warm.model_dir
    if (settings["epochs"] < 1 or settings["batch_size"] < 1 or settings["learning_rate"] <= 0 or not hidden
            or settings["sequence_units"] < 1 or not 0 <= settings["ema_momentum"] < 1
            or settings["numeric_bins"] < 0 or not 0 <= settings["dropout"] < 1):
        parser.error("--epochs, --batch_size and --sequence_units must be positive, --learning_rate > 0, "
                     "--hidden_units non-empty, --ema_momentum and --dropout in [0, 1), --numeric_bins >= 0")
    return Params(data_dir=args.data_dir, model_dir=model_dir, warm_start_from=args.warm_start_from, **settings)


def regression_metrics(errors: np.ndarray) -> dict[str, float]:
    return {"mae": float(np.mean(np.abs(errors))), "rmse": float(math.sqrt(np.mean(np.square(errors))))}


def split_sizes(data_dir: str) -> dict[str, int]:
    summary = json.loads((Path(data_dir) / "summary.json").read_text())
    return summary["examples"]


def labels(data_dir: str, split: str, spec: FeatureSpec, features: Sequence[str] = (), columns: bool = False):
    """One split's labels (a float per example: small, unlike the features);
    with `features` (or `columns`, even for none), (labels, {name: values}) of those few columns too."""
    from models.data import example_dataset

    chunks: dict[str, list] = {name: [] for name in features}
    parts = []
    for x, y in example_dataset(data_dir, split, spec, batch_size=8192, features=features):
        parts.append(y.numpy())
        for name in features:
            chunks[name].append(x[name].numpy())
    values = np.concatenate(parts)
    if features or columns:
        return values, {name: np.concatenate(chunk) for name, chunk in chunks.items()}
    return values


def rate_baseline(params: Params, spec: FeatureSpec, median: float) -> dict:
    """The rate baseline: label = rate x field (a fare per mile times the
    distance), rate = sum(label) / sum(field) over the training examples that
    have the field; the median of train where an example lacks it."""
    field = spec.rate_baseline
    flag = presence_name(field) if presence_name(field) in spec.presence_flags(with_windowed=False) else None
    names = (field, flag) if flag else (field,)

    def read(split):
        label, columns = labels(params.data_dir, split, spec, names)
        present = columns[flag] == 1 if flag else np.ones(len(label), dtype=bool)
        return label, columns[field].astype("float64"), present

    label, values, present = read("train")
    rate = float(label[present].sum() / values[present].sum())
    out = {"field": field, "rate": rate, "coverage": {}}
    for split in ("eval", "test"):
        label, values, present = read(split)
        out[split] = regression_metrics(np.where(present, rate * values, median) - label)
        out["coverage"][split] = float(present.mean())
    return out


def load_trainable(warm: WarmStart, inputs: ModelInputs):
    """The version's trainable Keras model (its weights, vocabularies, bins and
    normalizations as exported), uncompiled; WarmStartError if it does not
    take exactly these inputs."""
    import keras

    model = keras.models.load_model(warm.keras_model, compile=False)
    takes = {tensor.name for tensor in model.inputs}
    if takes != set(inputs.names):
        raise WarmStartError(f"{warm.keras_model} takes other inputs than the spec's model inputs: "
                             f"{sorted(takes ^ set(inputs.names))}")
    return model


def early_stopping(patience: int, start: tuple | None = None):
    """EarlyStopping on the eval loss, restoring the best epoch's weights.
    start: (eval loss, weights) of the model a warm start continues, which
    then counts as the epoch before the first: when no epoch beats it, its
    weights are restored (more training on the new data made eval worse)."""
    import keras

    class FromStart(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if start is not None:
                self.best, self.best_weights = start
                self.best_epoch = -1

        def on_train_end(self, logs=None):
            if start is not None and self.best_epoch < 0:
                logging.warning("no epoch beat the version continued on eval (loss %.4f): its weights are kept",
                                start[0])
            super().on_train_end(logs)

    return FromStart(monitor="val_loss", patience=patience, restore_best_weights=True)


def fit(params: Params, spec: FeatureSpec, inputs: ModelInputs, work_dir: str | Path, label_offset: float,
        extra_callbacks: Sequence = (), start=None):
    """Builds and trains one model, or with `start` (load_trainable's) trains
    that one further; resumes from work_dir/backup if a run there was interrupted.
    work_dir may be gs://: Keras writes remote checkpoints and TensorFlow remote logs through tf.io.gfile."""
    import keras

    from models.data import example_dataset
    from models.model import build_model, sample_features

    keras.utils.set_random_seed(params.seed)
    train = example_dataset(params.data_dir, "train", spec, params.batch_size, shuffle=True,
                            shuffle_buffer=params.shuffle_buffer, seed=params.seed, repeat=True, features=inputs.names)
    evaluation = example_dataset(params.data_dir, "eval", spec, params.batch_size, features=inputs.names)
    if start is None:
        sample = sample_features(
            example_dataset(params.data_dir, "train", spec, 4096, shuffle=True, shuffle_buffer=params.shuffle_buffer,
                            seed=ADAPT_SEED, features=inputs.names), params.adapt_examples)
        model = build_model(inputs, spec, sample, params.hidden_units, params.embedding_dim, params.cross_bins,
                            label_offset, sequence_units=params.sequence_units, dropout=params.dropout,
                            numeric_bins=params.numeric_bins)
    else:
        model = start
    sizes = split_sizes(params.data_dir)
    steps = math.ceil(sizes["train"] / params.batch_size)
    learning_rate = params.learning_rate
    if params.lr_schedule == "cosine":
        # By optimizer step: a resumed run (BackupAndRestore restores the step) continues the same curve.
        learning_rate = keras.optimizers.schedules.CosineDecay(params.learning_rate, params.epochs * steps,
                                                               alpha=LR_FLOOR)
    ema = params.ema_momentum > 0
    optimizer = keras.optimizers.Adam(learning_rate, use_ema=ema, ema_momentum=params.ema_momentum or 0.99)
    model.compile(optimizer=optimizer,
                  loss={"mae": "mae", "mse": "mse", "huber": keras.losses.Huber(delta=15.0)}[params.loss],
                  metrics=[keras.metrics.MeanAbsoluteError(name="mae"),
                           keras.metrics.RootMeanSquaredError(name="rmse")])
    # Exact eval steps: Keras warns whenever a dataset of unknown length ends.
    eval_steps = math.ceil(sizes["eval"] / params.batch_size)
    # Taken before fit, whose BackupAndRestore may load a resumed run's weights.
    continued = None if start is None else (
        model.evaluate(evaluation, steps=eval_steps, return_dict=True, verbose=0)["loss"], model.get_weights())
    callbacks = [
        keras.callbacks.BackupAndRestore(join(work_dir, "backup")),  # checkpoint each epoch; resume after a crash
        # With EMA: validation, early stopping's best weights and so the export use the averaged weights
        # (after the backup, which keeps the raw ones and the average in the optimizer).
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []),
        early_stopping(params.patience, continued),
        keras.callbacks.TensorBoard(log_dir=join(work_dir, "logs")),
        *extra_callbacks,
    ]
    history = model.fit(train, validation_data=evaluation, validation_steps=eval_steps,
                        epochs=params.epochs, steps_per_epoch=steps,
                        callbacks=callbacks, shuffle=False,  # the dataset shuffles itself
                        verbose=2 if not sys.stdout.isatty() else 1)
    return model, history


def evaluate(model, params: Params, spec: FeatureSpec, inputs: ModelInputs) -> dict[str, dict[str, float]]:
    """MAE and RMSE on eval and test, summed per example here: Keras' MAE metric
    averages per batch on 1-D outputs, which a final partial batch skews."""
    from models.data import example_dataset

    out = {}
    for split in ("eval", "test"):
        absolute = squared = count = 0.0
        for features, label in example_dataset(params.data_dir, split, spec, params.batch_size, features=inputs.names):
            errors = model(features, training=False).numpy().astype("float64") - label.numpy()
            absolute += float(np.abs(errors).sum())
            squared += float(np.square(errors).sum())
            count += len(errors)
        out[split] = {"mae": absolute / count, "rmse": math.sqrt(squared / count)}
    return out


def run(params: Params, extra_callbacks: Sequence = ()) -> str | Path:
    """Trains, evaluates against the baselines, exports; returns the version
    directory (a Path when --model_dir is local, else its URL)."""
    from models.export import export_saved_model

    started = time.monotonic()
    spec = training_spec(params.data_dir)
    warm = locate_warm_start(params.warm_start_from) if params.warm_start_from else None
    if warm is not None:
        check_warm_start_spec(warm, spec, params.data_dir)  # before anything is trained or written
        params = continuing(params, warm)
    model_dir = params.model_dir.rstrip("/") or "/"
    work_dir = join(model_dir, "work")
    logging.info("training on %s (spec %s %s)%s", params.data_dir, spec.name, spec.fingerprint[:12],
                 f", continuing {warm.version_dir}" if warm else "")

    ordinal = tuple(model_inputs(spec).ordinal)
    train_labels, train_ordinal = labels(params.data_dir, "train", spec, ordinal, columns=True)
    median = float(np.median(train_labels))
    metrics: dict = {"examples": split_sizes(params.data_dir), "median_of_train": {}}
    eval_labels, eval_ordinal = labels(params.data_dir, "eval", spec, ordinal, columns=True)
    metrics["median_of_train"]["eval"] = regression_metrics(eval_labels - median)
    metrics["median_of_train"]["test"] = regression_metrics(labels(params.data_dir, "test", spec) - median)
    # Only the eval split's inputs decide (never test's): its values that training never has. A warm start's
    # are the version's: they are part of its architecture.
    circular = (tuple(warm.metrics.get("circular", ())) if warm is not None
                else unseen_later(ordinal, train_ordinal, eval_ordinal))
    metrics["circular"] = list(circular)
    if circular:
        logging.info("on a circle instead of an embedding, not crossed (eval values training never has): %s",
                     ", ".join(circular))
    if spec.rate_baseline:
        metrics["rate_baseline"] = rate_baseline(params, spec, median)

    inputs = model_inputs(spec, circular=circular)
    start = None
    if warm is not None:
        start = load_trainable(warm, inputs)
        metrics["warm_start_from"] = {"version": warm.version, "path": warm.version_dir}
        metrics["before_warm_start"] = evaluate(start, params, spec, inputs)
    # A warm start's checkpoints apart: a rerun resumes it, never a scratch run's, nor another version's.
    fit_dir = join(work_dir, "model" if warm is None else f"warm_start_from_{warm.version}")
    model, history = fit(params, spec, inputs, fit_dir, median, extra_callbacks, start=start)
    metrics["model"] = evaluate(model, params, spec, inputs)
    metrics["epochs_run"] = len(history.history.get("loss", []))
    if params.baseline_model:
        logging.info("training the same model without the windowed features (the baseline)")
        without = model_inputs(spec, use_windowed=False, circular=circular)
        baseline, _ = fit(params, spec, without, join(work_dir, "no_windowed"), median)
        metrics["without_windowed_features"] = evaluate(baseline, params, spec, without)
        metrics["windowed_features_gain_mae"] = {
            split: metrics["without_windowed_features"][split]["mae"] - metrics["model"][split]["mae"]
            for split in ("eval", "test")}

    version = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    version_dir = join(model_dir, version)
    stats = read_data_stats(params.data_dir)
    export_saved_model(model, spec, inputs, join(version_dir, "saved_model"),
                       extra_assets=None if stats is None else {"stats.json": stats})
    model.save(join(version_dir, KERAS_MODEL))  # what a later warm start continues
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    write_text(join(version_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    write_text(join(version_dir, "params.json"), json.dumps(dataclasses.asdict(params), indent=2) + "\n")
    write_text(join(version_dir, "spec.json"), (Path(params.data_dir) / "spec.json").read_text())
    if stats is not None:
        write_text(join(version_dir, "stats.json"), stats)
    write_text(join(model_dir, "LATEST"), version + "\n")  # last: LATEST never names a partial version
    _print_summary(metrics, version_dir)
    return Path(version_dir) if is_local(version_dir) else version_dir


def continuing(params: Params, warm: WarmStart) -> Params:
    """params for continuing `warm`: its architecture and preprocessing
    settings (the loaded model has them, whatever params say), no baseline
    model, and warm_start_from naming the version itself (LATEST moves on)."""
    theirs = {name: tuple(warm.params[name]) if name == "hidden_units" else warm.params[name]
              for name in ARCHITECTURE if name in warm.params}
    differ = {name: value for name, value in theirs.items() if getattr(params, name) != value}
    if differ:
        logging.warning("a warm start keeps the architecture of %s: %s", warm.version_dir,
                        ", ".join(f"{name}={value}" for name, value in differ.items()))
    return dataclasses.replace(params, **theirs, baseline_model=False, warm_start_from=warm.version_dir)


def _print_summary(metrics: dict, version_dir: str | Path) -> None:
    rows = [("median of train", metrics["median_of_train"])]
    if "before_warm_start" in metrics:
        rows.append((f"continued {metrics['warm_start_from']['version']}", metrics["before_warm_start"]))
    if "rate_baseline" in metrics:
        baseline = metrics["rate_baseline"]
        rows.append((f"{baseline['rate']:.2f} x {baseline['field']}", baseline))
    if "without_windowed_features" in metrics:
        rows.append(("model without windowed features", metrics["without_windowed_features"]))
    rows.append(("model", metrics["model"]))
    lines = [f"training finished in {metrics['train_seconds']} s ({metrics['epochs_run']} epochs)",
             f"  {'':34} {'eval MAE':>9} {'eval RMSE':>10} {'test MAE':>9} {'test RMSE':>10}"]
    for name, values in rows:
        lines.append(f"  {name:34} {values['eval']['mae']:9.2f} {values['eval']['rmse']:10.2f} "
                     f"{values['test']['mae']:9.2f} {values['test']['rmse']:10.2f}")
    lines.append(f"  exported to {version_dir}/saved_model "
                 f"({KERAS_MODEL}, metrics.json, params.json, spec.json, stats.json beside it)")
    print("\n".join(lines), flush=True)


def main() -> None:
    quiet_tensorflow()  # before TensorFlow loads: no GPU/CPU-feature chatter
    params = parse_args(sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    from models.export import SpecMismatch

    try:
        run(params)
    except (FileNotFoundError, SpecMismatch, WarmStartError) as err:
        print(f"python -m models.train: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
