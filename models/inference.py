"""Serving the exported SavedModel from Beam's RunInference.

Keras 3 cannot load a SavedModel directory with `keras.models.load_model`,
so Beam's TensorFlow handlers fail on ours; `SavedModelHandler` loads it with
`tf.saved_model.load` (once per worker: RunInference shares the loaded model
across the DoFn's threads) and calls the `serving_default` signature on a
whole batch of serialized tf.Examples, the same bytes the batch branch
writes. One call per batch is what makes it fast: about 10x a per-row call.
Its elements are batches too (`KeyedBatch` in, `KeyedPredictions` out, one
each per model call; `per_request` unbatches): Beam's per-element cost
(microseconds an element, a sizeable part of the model's) is then paid once
per batch up to the model.

A model path may name the SavedModel itself, a training run's version
directory (`<model_dir>/<version>/`), or the model directory, whose LATEST
file names the newest version. Local paths and gs:// both work.

Given a model directory to watch (`WatchLatest`), the handler serves a
`ServingModel`: LATEST is read at most every poll_s, and a new version
serves from the next batch once `ModelCheck` has loaded it and checked its
spec (models/model_updates.py: why in the handler, not a side input).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import threading
import time
from itertools import repeat
from typing import Any, Callable, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms.events import DeadLetter
from transforms.examples import KeyedBatch, keyed_batch
from transforms.spec import FeatureSpec

MODEL_STAGE = "model"  # the dead-letter stage of a refused model version


class ModelLocation(NamedTuple):
    saved_model: str  # the directory holding saved_model.pb
    version: str  # the training run's version (its directory name)
    from_latest: bool = False  # found through a model directory's LATEST (which may move on)


def version_of(saved_model: str) -> str:
    """The version a SavedModel directory belongs to: `<model_dir>/<version>/saved_model`."""
    parent, name = posixpath.split(saved_model.rstrip("/"))
    return posixpath.basename(parent) if name == "saved_model" else name


def locate_model(path: str) -> ModelLocation:
    """A model path (SavedModel, version directory or model directory) ->
    where its SavedModel is and which version it is."""
    import tensorflow as tf

    path = path.rstrip("/")
    exists = tf.io.gfile.exists
    if exists(posixpath.join(path, "saved_model.pb")):
        return ModelLocation(path, version_of(path))
    if exists(posixpath.join(path, "saved_model", "saved_model.pb")):
        return ModelLocation(posixpath.join(path, "saved_model"), posixpath.basename(path))
    latest = posixpath.join(path, "LATEST")
    if exists(latest):
        with tf.io.gfile.GFile(latest) as f:
            version = f.read().strip()
        return locate_model(posixpath.join(path, version))._replace(from_latest=True)
    raise FileNotFoundError(
        f"no SavedModel at {path}: give the model directory of `python -m models.train` (it holds LATEST), "
        "one of its version directories, or a saved_model directory")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A loaded model (a plain class: Beam's shared-model cache holds a weak reference to it)."""

    saved_model: Any  # what tf.saved_model.load returned: it owns the variables `serve` reads
    serve: Any  # the serving_default ConcreteFunction
    version: str


def load_checked_model(path: str, spec: FeatureSpec) -> LoadedModel:
    """Loads the SavedModel at `path`, ready to serve: SpecMismatch if it was
    trained on another spec, ValueError if it cannot score an example of it.

    The signature's first call costs about half a second more than the next
    ones (TensorFlow prepares the function on its first run), so the load
    makes it, on `placeholder_example`: the first batch served, at start or
    after a model swap, is not the slow one."""
    import tensorflow as tf

    from models.export import check_model_spec

    location = locate_model(path)
    loaded = tf.saved_model.load(location.saved_model)
    check_model_spec(loaded, spec, where=f"model {location.saved_model}")
    model = LoadedModel(loaded, loaded.signatures["serving_default"], location.version)
    try:
        predict([placeholder_example(spec)], model)
    except tf.errors.OpError as err:
        raise ValueError(f"model {location.saved_model} cannot score an example of spec {spec.name!r}: "
                         f"{err.message}") from None
    return model


def placeholder_example(spec: FeatureSpec) -> bytes:
    """A serialized tf.Example (no label) that parses under the spec: every
    column of transforms/examples.py there, each value 0 (b"" for strings)."""
    import tensorflow as tf

    from transforms.examples import example_columns

    def feature(dtype: str, size: int):
        if dtype == "bytes":
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""] * size))
        if dtype == "int64":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[0] * size))
        return tf.train.Feature(float_list=tf.train.FloatList(value=[0.0] * size))

    features = {column.name: feature(column.dtype, column.size) for column in example_columns(spec)
                if column.role != "label"}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def read_latest(model_dir: str) -> Optional[str]:
    """The version LATEST names, or None when there is none (yet)."""
    import tensorflow as tf

    path = posixpath.join(model_dir, "LATEST")
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as latest:
        return latest.read().strip() or None


class ModelCheck:
    """Whether LATEST names a new version, and whether that version may serve.
    `load` (injectable for tests) loads a version directory and raises
    SpecMismatch when it was trained on another spec."""

    def __init__(self, model_dir: str, spec: FeatureSpec, load: Optional[Callable] = None):
        self.model_dir = model_dir.rstrip("/")
        self._spec = spec
        self._load = load or self._load_checked

    def _load_checked(self, path: str):
        return load_checked_model(path, self._spec)

    def judge(self, version: Optional[str], seen: Optional[str]) -> tuple[object, Optional[DeadLetter]]:
        """(the loaded model, None) for a new version that may serve, (None, its
        dead letter) for a refused one, (None, None) when nothing is new."""
        from models.export import SpecMismatch

        if version is None or version == seen:
            return None, None
        where = posixpath.join(self.model_dir, version)
        try:
            return self._load(where), None
        except (SpecMismatch, OSError, ValueError) as err:
            return None, DeadLetter(f"model:{where}", version, f"model version {version} refused, the serving model "
                                    f"keeps serving: {err}", MODEL_STAGE)


class ServingModel:
    """The model a worker serves with, swapped for a newer accepted version of
    LATEST at most every `poll_s`; shared by RunInference's threads."""

    def __init__(self, check: ModelCheck, current, poll_s: float, clock: Callable[[], float]):
        self._check = check
        self.current = current  # a models.inference.LoadedModel
        self._poll_s = poll_s
        self._clock = clock
        self._seen = current.version  # refused versions are remembered too: loaded once
        self._next_poll_s = clock() + poll_s
        self._lock = threading.Lock()

    def model(self):
        """The model for the next batch."""
        if self._clock() < self._next_poll_s or not self._lock.acquire(blocking=False):
            return self.current  # another thread is polling: serve on with what there is
        try:
            self._next_poll_s = self._clock() + self._poll_s
            try:
                version = read_latest(self._check.model_dir)
            except OSError as err:  # a storage hiccup: the next poll tries again
                logging.warning("could not read %s/LATEST: %s", self._check.model_dir, err)
                return self.current
            loaded, dead = self._check.judge(version, self._seen)
            if version is not None:
                self._seen = version
            if dead is not None:
                logging.error("%s", dead.reason)
            elif loaded is not None:
                logging.info("model version %s serves from now on (was %s)", loaded.version, self.current.version)
                self.current = loaded
            return self.current
        finally:
            self._lock.release()


class WatchLatest(NamedTuple):
    """Serve newer versions of a model directory as LATEST names them (models/model_updates.py)."""

    model_dir: str
    poll_s: float
    clock: Callable[[], float] = time.time  # injectable: tests drive the polls


class KeyedPredictions(NamedTuple):
    """What SavedModelHandler answers for one KeyedBatch: its keys and
    examples, a prediction per example in the same order, and the model
    version that made them (one per batch: a batch is one model call)."""

    keys: tuple[Any, ...]
    examples: tuple[bytes, ...]
    predictions: tuple[float, ...]
    model_version: str


class SavedModelHandler(ModelHandler[KeyedBatch, KeyedPredictions, Any]):
    """KeyedBatch (keyed serialized tf.Examples without label,
    transforms/examples.py) -> KeyedPredictions: one signature call and one
    output per batch; `per_request` then gives each request its (key,
    PredictionResult), exactly one.

    Each element is already a batch, so RunInference's own batching is off
    (`should_skip_batching`) and Beam's per-element cost around the model is
    paid once per batch, not once per example. Batch where the examples are
    encoded (`EncodeExamples` emits KeyedBatches) or, for keyed
    examples that come one by one, with `KeyedBatches`. RunInference's
    metrics still count examples (the `len` of a KeyedBatch); a batch that
    fails comes out of `with_exception_handling()` whole, as (KeyedBatch,
    error), and each of its requests is a dead letter (beam_app/bigquery/tables.py).

    watch: the model directory whose LATEST may move on while the job runs:
    each batch is predicted by the newest accepted version (ServingModel)."""

    def __init__(self, model_path: str, spec: FeatureSpec, watch: Optional[WatchLatest] = None):
        super().__init__()
        self._model_path = model_path
        self._spec = spec
        self._watch = watch

    def load_model(self):
        loaded = load_checked_model(self._model_path, self._spec)
        if self._watch is None:
            return loaded
        return ServingModel(ModelCheck(self._watch.model_dir, self._spec), loaded, self._watch.poll_s,
                            self._watch.clock)

    def should_skip_batching(self) -> bool:
        return True  # each element is a batch

    def run_inference(self, batch: KeyedBatch, model,
                      inference_args: Optional[dict[str, Any]] = None) -> list[KeyedPredictions]:
        return [predict_keyed(batch, model if isinstance(model, LoadedModel) else model.model())]

    def get_num_bytes(self, batch: KeyedBatch) -> int:
        return sum(map(len, batch.examples))

    def get_metrics_namespace(self) -> str:
        return "inference"

    def update_model_path(self, model_path: Optional[str] = None) -> None:
        if model_path:
            self._model_path = model_path


class KeyedBatches(beam.PTransform):
    """PCollection[(key, bytes)] -> PCollection[KeyedBatch] of up to
    max_batch_size examples each (BatchElements: the size adapts to the
    runner; in streaming a batch never waits beyond its bundle), for
    `SavedModelHandler` where keyed examples come one by one."""

    def __init__(self, min_batch_size: int = 1, max_batch_size: int = 1024, label: Optional[str] = None):
        super().__init__(label)
        self._batching = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}

    def expand(self, pairs):
        return (pairs
                | "Batch" >> beam.BatchElements(**self._batching)
                | "ToKeyedBatch" >> beam.Map(keyed_batch).with_output_types(KeyedBatch))


def predict(examples: Sequence[bytes], model: LoadedModel) -> list[float]:
    """One signature call for the whole batch -> one prediction per example, in order."""
    import tensorflow as tf

    if not examples:  # the signature cannot take an empty batch
        return []
    predictions = model.serve(examples=tf.constant(examples, dtype=tf.string))["prediction"].numpy()
    if predictions.shape != (len(examples),):
        raise ValueError(f"model {model.version} returned predictions of shape {predictions.shape} "
                         f"for a batch of {len(examples)}: expected one per example")
    return predictions.tolist()


def predict_keyed(batch: KeyedBatch, model: LoadedModel) -> KeyedPredictions:
    """A KeyedBatch -> its KeyedPredictions (one signature call)."""
    return KeyedPredictions(batch.keys, batch.examples, tuple(predict(batch.examples, model)), model.version)


def per_request(predictions: KeyedPredictions) -> list[tuple[Any, PredictionResult]]:
    """KeyedPredictions -> (key, PredictionResult(example, prediction, model
    version)) for each request of the batch, in order: exactly one each."""
    # _make, not PredictionResult(...): its __new__ is a Python call per example
    results = map(PredictionResult._make, zip(predictions.examples, predictions.predictions,
                                               repeat(predictions.model_version)))
    return list(zip(predictions.keys, results))
