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
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms.spec import FeatureSpec


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
        from models.model_updates import ModelCheck, ServingModel

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
