"""The Keras model, built from `ModelInputs`: a wide part (hashed crosses such
as origin x hour, each a learned weight per bucket) beside a deep part
(embeddings of the categorical and ordinal fields, a point on a circle for
the circular ones, numbers and windowed features normalized and
piecewise-linear, a GRU over each sequence, presence flags, through dense
layers). Every preprocessing step is
a layer of the model, fitted on a bounded sample of the training split, so
serving applies exactly what training applied.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.features import ModelInputs
from transforms.examples import tf_dtypes
from transforms.spec import FeatureSpec, presence_name

def sample_features(dataset: tf.data.Dataset, max_examples: int, with_labels: bool = False):
    """Up to max_examples of a (features, label) dataset as arrays: what the
    vocabularies and normalizers are fitted on (bounded, whatever the split size).
    With with_labels, (features, labels)."""
    columns: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    seen = 0
    for features, label in dataset:
        for name, values in features.items():
            columns.setdefault(name, []).append(values.numpy())
        labels.append(label.numpy())
        seen += len(label)
        if seen >= max_examples:
            break
    features = {name: np.concatenate(parts)[:max_examples] for name, parts in columns.items()}
    return (features, np.concatenate(labels)[:max_examples]) if with_labels else features


def _normalization(name: str, values: np.ndarray) -> layers.Normalization:
    """Standardizes by the sample's mean and variance. A feature constant in the
    sample (one month in a short history) would be divided by ~0 and explode
    on new values: centred only."""
    variance = float(values.var()) if len(values) else 1.0
    return layers.Normalization(axis=None, mean=float(values.mean()) if len(values) else 0.0,
                                variance=variance if variance > 1e-12 else 1.0, name=f"{name}_normalize")


def _piecewise_linear(value, values: np.ndarray, bins: int):
    """The piecewise-linear encoding of a number over the sample's quantile
    bins (Gorishniy et al. 2022, "On Embeddings for Numerical Features in
    Tabular Deep Learning"): component i is 1 above bin i, 0 below, linear
    inside; the dense layers then learn a step-like response per feature as
    trees do. None where the sample has fewer than two distinct bins."""
    if not len(values):
        return None
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 3:
        return None
    low, width = edges[:-1].astype("float32"), np.diff(edges).astype("float32")
    return ops.clip(ops.divide(ops.subtract(ops.expand_dims(value, -1), low), width), 0.0, 1.0)


def build_model(inputs: ModelInputs, spec: FeatureSpec, sample: dict[str, np.ndarray],
                hidden_units: Sequence[int] = (256, 128, 64), embedding_dim: int = 8,
                cross_bins: int = 1024, label_offset: float = 0.0, sequence_units: int = 16,
                dropout: float = 0.0, numeric_bins: int = 0) -> keras.Model:
    """An uncompiled model: dict of example features -> prediction of shape (batch,)."""
    dtypes = tf_dtypes(spec)
    sizes = {name: k for name, _, k in inputs.sequences}
    feeds = {name: keras.Input(shape=(sizes[name],) if name in sizes else (), dtype=dtypes[name], name=name)
             for name in inputs.names}
    deep, wide = [], []

    for name in inputs.categorical:
        lookup = layers.StringLookup(name=f"{name}_lookup")
        lookup.adapt(sample[name])
        deep.append(layers.Embedding(lookup.vocabulary_size(), embedding_dim, name=f"{name}_embedding")(
            lookup(feeds[name])))
    for name, (low, high) in inputs.ordinal.items():
        if name in inputs.circular:
            # Eval holds values training never has (features.py): a point on a circle, not an embedding
            # (eval MAE 10.870 -> 10.852, seed 7: 10.876 -> 10.853; month crosses out too).
            angle = ops.multiply(ops.cast(ops.subtract(feeds[name], low), "float32"), 2 * np.pi / (high - low + 1))
            deep += [ops.expand_dims(ops.cos(angle), -1), ops.expand_dims(ops.sin(angle), -1)]
            continue
        lookup = layers.IntegerLookup(vocabulary=list(range(low, high + 1)), name=f"{name}_lookup")
        deep.append(layers.Embedding(lookup.vocabulary_size(), embedding_dim, name=f"{name}_embedding")(
            lookup(feeds[name])))
    for name in (*inputs.numeric, *inputs.windowed):
        value = ops.cast(feeds[name], "float32")
        values = sample[name].astype("float64")
        if name in inputs.log_scaled:
            value = ops.log1p(ops.maximum(value, 0.0))
            values = np.log1p(np.maximum(values, 0.0))
        deep.append(ops.expand_dims(_normalization(name, values)(value), -1))
        if numeric_bins:
            flag = presence_name(name) if presence_name(name) in inputs.presence else None
            present = values[sample[flag] == 1] if flag else values
            encoded = _piecewise_linear(value, present, numeric_bins)
            if encoded is not None:
                if flag:  # a missing value encodes as all zeros (its flag says which zeros are missing)
                    encoded = ops.multiply(encoded, ops.expand_dims(ops.cast(feeds[flag], "float32"), -1))
                deep.append(encoded)
    for name, length, k in inputs.sequences:
        # Newest first, `length` of the k real: the GRU reads the real ones, masked.
        lengths = sample[length].astype("int64")
        real = sample[name][np.arange(k)[None, :] < lengths[:, None]].astype("float64")
        value = ops.cast(feeds[name], "float32")
        steps = ops.expand_dims(_normalization(name, real)(value), -1)
        # keras.ops only: a TensorFlow op on a KerasTensor fails when the model is built.
        mask = ops.less(ops.expand_dims(ops.arange(k, dtype="int32"), 0),
                        ops.expand_dims(ops.cast(feeds[length], "int32"), -1))
        # go_backwards: the GRU reads the k values oldest first, ending on the latest (eval MAE 10.906 -> 10.901).
        deep.append(layers.GRU(sequence_units, go_backwards=True, name=f"{name}_gru")(steps, mask=mask))
        deep.append(ops.expand_dims(ops.cast(feeds[length], "float32") / k, -1))
    for name in inputs.presence:
        deep.append(ops.expand_dims(ops.cast(feeds[name], "float32"), -1))
    for first, second in inputs.crosses:
        crossed = layers.HashedCrossing(cross_bins, name=f"{first}_x_{second}")((feeds[first], feeds[second]))
        wide.append(layers.Embedding(cross_bins, 1, embeddings_initializer="zeros",
                                     name=f"{first}_x_{second}_weight")(crossed))

    hidden = layers.Concatenate(name="deep_inputs")(deep)
    for index, units in enumerate(hidden_units):
        hidden = layers.Dense(units, activation="relu", name=f"hidden_{index}")(hidden)
        if dropout > 0:
            hidden = layers.Dropout(dropout, name=f"dropout_{index}")(hidden)
    output = layers.Dense(1, bias_initializer=keras.initializers.Constant(label_offset), name="deep_output")(hidden)
    if wide:
        output = layers.Add(name="wide_and_deep")([output, *wide])
    prediction = layers.Reshape((), name="prediction")(output)
    return keras.Model(feeds, prediction, name="wide_and_deep")
