"""tf.data input pipelines over the batch job's TFRecord shards.

Files are interleaved and examples shuffled through a bounded buffer, then
batched and parsed together (`tf.io.parse_example` on a whole batch is far
cheaper than per example): a split is never loaded into memory whole.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from transforms.examples import parse_feature_spec
from transforms.spec import FeatureSpec


SHUFFLE_BLOCK = 64  # records shuffled together


def split_files(data_dir: str, split: str) -> list[str]:
    files = sorted(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{split}/examples-*.tfrecord.gz"))
    if not files:
        raise FileNotFoundError(f"no {split} examples under {data_dir}: run python -m beam_app.batch first "
                                f"(or pass the --output it wrote to)")
    return files


def example_dataset(data_dir: str, split: str, spec: FeatureSpec, batch_size: int, shuffle: bool = False,
                    shuffle_buffer: int = 10_000, seed: Optional[int] = None, repeat: bool = False,
                    features: Optional[Sequence[str]] = None) -> tf.data.Dataset:
    """Batches of (features dict, label) from one split; label is float32 of shape (batch,).
    `features`: the example features to parse (default: all but the label)."""
    files = split_files(data_dir, split)
    label = spec.label.name
    parse_spec = parse_feature_spec(spec)
    keep = [name for name in parse_spec if name != label] if features is None else list(features)
    parse_spec = {name: parse_spec[name] for name in (*keep, label)}

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, parse_spec)
        return {name: parsed[name] for name in keep}, parsed[label]

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        # With a seed the order is reproducible (a resumed run must fit the same preprocessing).
        cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle or seed is not None)
    if repeat:
        dataset = dataset.repeat()
    if shuffle:
        # Shuffle blocks of records, not records: the same window of about
        # shuffle_buffer examples at 1/BLOCK of the per-element cost, which on
        # two cores otherwise takes CPU from training.
        dataset = (dataset.batch(SHUFFLE_BLOCK)
                   .shuffle(max(1, shuffle_buffer // SHUFFLE_BLOCK), seed=seed, reshuffle_each_iteration=True)
                   .rebatch(batch_size))
    else:
        dataset = dataset.batch(batch_size)
    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
