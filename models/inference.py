"""Serving the exported SavedModel from Beam's RunInference.

Keras 3 cannot load a SavedModel directory with `keras.models.load_model`,
so Beam's TensorFlow handlers fail on ours; `SavedModelHandler` loads it with
`tf.saved_model.load` (once per worker: RunInference shares the loaded model
across the DoFn's threads) and calls the `serving_default` signature on a
whole batch of serialized tf.Examples, the same bytes the batch branch
writes. One call per batch is what makes it fast: about 10x a per-row call.

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
from typing import Any, Callable, NamedTuple, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms.events import DeadLetter
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
    """Loads the SavedModel at `path`; SpecMismatch if it was trained on another spec."""
    import tensorflow as tf

    from models.export import check_model_spec

    location = locate_model(path)
    loaded = tf.saved_model.load(location.saved_model)
    check_model_spec(loaded, spec, where=f"model {location.saved_model}")
    return LoadedModel(loaded, loaded.signatures["serving_default"], location.version)


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


class SavedModelHandler(ModelHandler[bytes, float, Any]):
    """bytes (a serialized tf.Example without label) -> PredictionResult(example,
    prediction as float, model version). Wrap it in `KeyedModelHandler` to
    carry each example's key through.

    watch: the model directory whose LATEST may move on while the job runs:
    each batch is predicted by the newest accepted version (ServingModel)."""

    def __init__(self, model_path: str, spec: FeatureSpec, min_batch_size: int = 1, max_batch_size: int = 1024,
                 max_batch_duration_secs: Optional[int] = None, watch: Optional[WatchLatest] = None):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         max_batch_duration_secs=max_batch_duration_secs)
        self._model_path = model_path
        self._spec = spec
        self._watch = watch

    def load_model(self):
        loaded = load_checked_model(self._model_path, self._spec)
        if self._watch is None:
            return loaded
        return ServingModel(ModelCheck(self._watch.model_dir, self._spec), loaded, self._watch.poll_s,
                            self._watch.clock)

    def run_inference(self, batch: Sequence[bytes], model,
                      inference_args: Optional[dict[str, Any]] = None) -> list[PredictionResult]:
        return predict(batch, model if isinstance(model, LoadedModel) else model.model())

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(example) for example in batch)

    def get_metrics_namespace(self) -> str:
        return "inference"

    def update_model_path(self, model_path: Optional[str] = None) -> None:
        if model_path:
            self._model_path = model_path


def predict(batch: Sequence[bytes], model: LoadedModel) -> list[PredictionResult]:
    """One signature call for the whole batch."""
    import tensorflow as tf

    if not batch:  # the signature cannot take an empty batch
        return []
    predictions = model.serve(examples=tf.constant(list(batch), dtype=tf.string))["prediction"].numpy()
    if predictions.shape != (len(batch),):
        raise ValueError(f"model {model.version} returned predictions of shape {predictions.shape} "
                         f"for a batch of {len(batch)}: expected one per example")
    return [PredictionResult(example, float(value), model.version) for example, value in zip(batch, predictions)]
