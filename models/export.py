"""SavedModel export and the checks a serving job makes before using one.

The exported SavedModel has three signatures:
- `serving_default`: a batch of serialized tf.Examples (the bytes the batch
  branch writes, label absent) -> {"prediction": float32 (batch,)};
- `serve_features`: the same model on raw named feature tensors;
- `spec_fingerprint`: no input -> {"fingerprint": the spec's sha256}.
The spec itself is copied to `assets.extra/spec.json` (TF Serving's place
for files a model carries but does not load), and any extra assets given
(training passes the batch job's `stats.json`) beside it.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Mapping, Optional

import keras
import tensorflow as tf

from models.features import ModelInputs
from transforms.examples import parse_feature_spec, tf_dtypes
from transforms.spec import FeatureSpec

class SpecMismatch(ValueError):
    """The model was trained on another feature spec than the one in use."""


def export_saved_model(model: keras.Model, spec: FeatureSpec, inputs: ModelInputs, path: str | Path,
                       extra_assets: Optional[Mapping[str, str]] = None) -> None:
    """Writes the SavedModel to path; extra_assets ({file name: text}) go to its assets.extra/."""
    parse_spec = {name: feature for name, feature in parse_feature_spec(spec, with_label=False).items()
                  if name in inputs.names}
    dtypes = tf_dtypes(spec)
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return {"prediction": model(tf.io.parse_example(examples, parse_spec), training=False)}

    sizes = {name: k for name, _, k in inputs.sequences}
    shapes = {name: [None, sizes[name]] if name in sizes else [None] for name in inputs.names}

    @tf.function(input_signature=[{name: tf.TensorSpec(shapes[name], dtypes[name], name=name)
                                   for name in inputs.names}])
    def serve_features(features):
        return {"prediction": model(features, training=False)}

    @tf.function(input_signature=[])
    def spec_fingerprint():
        return {"fingerprint": tf.constant(spec.fingerprint)}

    archive.add_endpoint("serving_default", serve_examples)
    archive.add_endpoint("serve_features", serve_features)
    archive.add_endpoint("spec_fingerprint", spec_fingerprint)
    archive.write_out(str(path), verbose=False)
    extra = posixpath.join(str(path), "assets.extra")  # through gfile: the export may go to gs://
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(posixpath.join(extra, "spec.json"), "w") as out:
        out.write(json.dumps({"spec": spec.to_document(), "fingerprint": spec.fingerprint}, indent=2) + "\n")
    for name, text in (extra_assets or {}).items():
        with tf.io.gfile.GFile(posixpath.join(extra, name), "w") as out:
            out.write(text)


def model_fingerprint(loaded) -> str:
    """The spec fingerprint a loaded SavedModel was trained with."""
    return loaded.signatures["spec_fingerprint"]()["fingerprint"].numpy().decode()


def check_model_spec(loaded, spec: FeatureSpec, where: str = "the model") -> None:
    """Refuses a model trained on another spec, saying which prints differ."""
    trained = model_fingerprint(loaded)
    if trained != spec.fingerprint:
        raise SpecMismatch(
            f"{where} was trained on spec {trained[:12]}, but this job uses spec {spec.name!r} "
            f"{spec.fingerprint[:12]}: retrain on data written with this spec, or run with the spec the model "
            "was trained on (its copy is in assets.extra/spec.json)")
