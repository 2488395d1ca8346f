"""The tf.train.Example layout, derived from the spec, and `EncodeExamples`.

`example_columns(spec)` is the one description of what an encoded example
holds; the encoder, `spec.json` and the parse spec of readers all come from it:

- `event_id` (bytes)
- each static request feature (string -> bytes, int -> int64, float -> float32);
  an optional number is always there, 0 when missing, with `<name>_present`
  (int64 0/1); an optional string is an empty list when missing (read as b'')
- each windowed feature: `count` and `count_distinct` as int64, 0 on an empty
  window; `last_k` as exactly k float32 values, newest first, 0-padded, with
  `<name>_length` (int64, how many are real); the others float32 with
  `<name>_present` (int64 0/1), an empty window encoding 0 and present = 0.
  A feature whose key a request may lack (an optional key field) always has
  `<name>_present`: 0 when the request had no key value
- the label (float32), absent on live requests

Encoding goes through Arrow RecordBatches and tfx-bsl's C++ encoder: building
protos in Python costs about 10x more. The batch job applies the two halves
itself, `RecordBatches` (FeatureRow -> pa.RecordBatch) then
`EncodeRecordBatches` (-> bytes), so that `transforms/feature_stats.py`
describes the very batches that are encoded; `EncodeExamples` is the two in
one (keyed, for streaming, it encodes from the rows, which carry the key,
and emits each encoded batch as one `KeyedBatch`, what RunInference takes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms import counters
from transforms.spec import LENGTH_SUFFIX, PRESENCE_SUFFIX, FeatureSpec, length_name, presence_name
from transforms.feature_layout import FeatureRow

_ARROW = {"bytes": pa.binary(), "int64": pa.int64(), "float32": pa.float32()}
_FIELD_DTYPE = {"string": "bytes", "int": "int64", "float": "float32"}


class ExampleColumn(NamedTuple):
    name: str
    dtype: str  # "bytes" | "int64" | "float32"
    role: str  # "id" | "static" | "static_presence" | "windowed" | "sequence" | "length" | "presence" | "label"
    always_present: bool  # False: may be absent from an example (parse with a default)
    size: int = 1  # values per example: k for a sequence

    @property
    def is_sequence(self) -> bool:
        """A list of `size` values (even of one), not a scalar."""
        return self.role == "sequence"


def example_columns(spec: FeatureSpec) -> tuple[ExampleColumn, ...]:
    columns = [ExampleColumn("event_id", "bytes", "id", True)]
    for field in spec.request_fields:
        columns.append(ExampleColumn(field.name, _FIELD_DTYPE[field.type], "static",
                                     field.required or field.has_presence))
        if field.has_presence:
            columns.append(ExampleColumn(presence_name(field.name), "int64", "static_presence", True))
    for feature in spec.windowed_features:
        if feature.rule.sequence:
            columns.append(ExampleColumn(feature.name, "float32", "sequence", True, feature.k))
            columns.append(ExampleColumn(length_name(feature.name), "int64", "length", True))
        else:
            columns.append(ExampleColumn(feature.name, "int64" if feature.rule.integer else "float32", "windowed",
                                         True))
        if feature.has_presence:
            columns.append(ExampleColumn(presence_name(feature.name), "int64", "presence", True))
    columns.append(ExampleColumn(spec.label.name, "float32", "label", False))
    return tuple(columns)


def _sequence_column(values: Sequence, size: int) -> pa.Array:
    """A tuple of up to `size` floats per row (None: no key value) -> a
    list<float32> column of exactly `size` values, 0-padded."""
    flat = np.zeros(len(values) * size, dtype=np.float32)
    for row, sequence in enumerate(values):
        if sequence:
            flat[row * size:row * size + len(sequence)] = sequence
    offsets = np.arange(0, len(values) * size + 1, size, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _list_column(values: Sequence, dtype: str) -> pa.Array:
    """One value per row -> a list<dtype> column; None becomes a null list
    (the feature is left out of that example)."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(valid, out=offsets[1:])
    present = values if valid.all() else [v for v in values if v is not None]
    if dtype == "bytes":
        present = [v.encode() if isinstance(v, str) else v for v in present]
    flat = pa.array(present, type=_ARROW[dtype])
    mask = None if valid.all() else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=mask)


def rows_to_record_batch(spec: FeatureSpec, rows: Sequence[FeatureRow], with_label: bool = True) -> pa.RecordBatch:
    """FeatureRows -> a RecordBatch with one list column per example column."""
    arrays, names = [], []
    slots = {f.name: i for i, f in enumerate(spec.windowed_features)}
    flagged = {f.name for f in spec.request_fields if f.has_presence}
    for column in example_columns(spec):
        if column.role == "label" and not with_label:
            continue
        if column.role == "id":
            values = [row.event.event_id for row in rows]
        elif column.role in ("static", "label"):
            values = [row.event.fields.get(column.name) for row in rows]
            if column.name in flagged:  # missing: 0 here, 0 in its flag
                values = [0 if v is None else v for v in values]
        elif column.role == "static_presence":
            field = column.name.removesuffix(PRESENCE_SUFFIX)
            values = [0 if row.event.fields.get(field) is None else 1 for row in rows]
        elif column.role == "presence":
            slot = slots[column.name.removesuffix(PRESENCE_SUFFIX)]
            values = [0 if row.features[slot] is None else 1 for row in rows]
        elif column.role == "sequence":
            slot = slots[column.name]
            arrays.append(_sequence_column([row.features[slot] for row in rows], column.size))
            names.append(column.name)
            continue
        elif column.role == "length":
            slot = slots[column.name.removesuffix(LENGTH_SUFFIX)]
            values = [len(row.features[slot] or ()) for row in rows]
        else:
            slot = slots[column.name]
            values = [row.features[slot] for row in rows]
            values = [0 if v is None else v for v in values]
            if column.dtype == "int64":
                values = [int(v) for v in values]
        arrays.append(_list_column(values, column.dtype))
        names.append(column.name)
    return pa.RecordBatch.from_arrays(arrays, names)


def is_labeled(spec: FeatureSpec, row: FeatureRow) -> bool:
    return row.event.fields.get(spec.label.name) is not None


def tf_dtypes(spec: FeatureSpec) -> dict:
    """Each example column's TensorFlow dtype, by name."""
    import tensorflow as tf  # only readers need TensorFlow

    dtypes = {"bytes": tf.string, "int64": tf.int64, "float32": tf.float32}
    return {column.name: dtypes[column.dtype] for column in example_columns(spec)}


def parse_feature_spec(spec: FeatureSpec, with_label: bool = True) -> dict:
    """The `tf.io.parse_example` feature spec of the encoded examples."""
    import tensorflow as tf

    dtypes = tf_dtypes(spec)
    defaults = {"bytes": b"", "int64": 0, "float32": 0.0}
    parse = {}
    for column in example_columns(spec):
        if column.role == "label" and not with_label:
            continue
        default = None if column.always_present else defaults[column.dtype]
        shape = [column.size] if column.is_sequence else []
        parse[column.name] = tf.io.FixedLenFeature(shape, dtypes[column.name], default_value=default)
    return parse


def decode_example(spec: FeatureSpec, serialized: bytes) -> dict:
    """A serialized tf.Example -> {column: value} for every example column but
    the id and the label: str, int, or float (the float32 the model reads,
    exactly), None where the example leaves it out. The served-features log
    is this, for the very bytes the model scored."""
    from tensorflow.core.example import example_pb2  # the protobuf alone, not the TensorFlow runtime

    example = example_pb2.Example.FromString(serialized)
    features = example.features.feature
    decoded = {}
    for column in example_columns(spec):
        if column.role in ("id", "label"):
            continue
        feature = features.get(column.name)
        values = None
        if feature is not None:
            values = (feature.bytes_list.value if column.dtype == "bytes" else
                      feature.int64_list.value if column.dtype == "int64" else feature.float_list.value)
        if not values:
            decoded[column.name] = None
        elif column.is_sequence:
            decoded[column.name] = [float(v) for v in values]  # float32 -> float: exact
        elif column.dtype == "bytes":
            decoded[column.name] = values[0].decode()
        else:
            decoded[column.name] = values[0] if column.dtype == "int64" else float(values[0])
    return decoded


def row_values(spec: FeatureSpec, row: FeatureRow) -> dict:
    """A FeatureRow -> what `decode_example` gives for its encoded example,
    through the same encoding (float32 included): what batch would serve."""
    batch = rows_to_record_batch(spec, [row], with_label=False)
    sequences = {column.name for column in example_columns(spec) if column.is_sequence}
    values = {}
    for name, column in zip(batch.schema.names, batch.columns):
        if name == "event_id":
            continue
        cell = column[0].as_py()
        if name in sequences:
            values[name] = cell
            continue
        value = cell[0] if cell else None
        values[name] = value.decode() if isinstance(value, bytes) else value
    return values


class RequestKey(NamedTuple):
    """What a keyed example carries along (through RunInference) to its prediction."""

    event_id: str
    time_us: int


@dataclasses.dataclass(frozen=True)
class KeyedBatch:
    """Keyed serialized tf.Examples as one element: the examples of a batch in
    one tuple, their keys (RequestKey in the streaming job) in another, in the
    same order. What RunInference takes in the streaming job (one model call
    each, models/inference.py): Beam's per-element cost is paid once per batch
    up to the model. A sequence of its (key, example) pairs: `len` is how many
    examples, iterating gives the pairs."""

    keys: tuple[Any, ...]
    examples: tuple[bytes, ...]

    def __post_init__(self):
        if len(self.keys) != len(self.examples):
            raise ValueError(f"a keyed batch of {len(self.keys)} keys and {len(self.examples)} examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[tuple[Any, bytes]]:
        return zip(self.keys, self.examples)


def keyed_batch(pairs: Iterable[tuple[Any, bytes]]) -> KeyedBatch:
    """(key, serialized tf.Example) pairs -> one KeyedBatch of them, in their order."""
    pairs = list(pairs)
    return KeyedBatch(tuple(key for key, _ in pairs), tuple(example for _, example in pairs))


class _EncodeKeyedBatchDoFn(beam.DoFn):
    """list[FeatureRow] -> one KeyedBatch: their serialized tf.Examples keyed
    by RequestKey (the rows carry the key; a RecordBatch does not)."""

    def __init__(self, spec: FeatureSpec, with_label: bool):
        self._spec = spec
        self._with_label = with_label
        self._encoded = counters.EXAMPLES_ENCODED.metric()

    def setup(self):
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        self._encoder = RecordBatchToExamplesEncoder()

    def process(self, rows: list[FeatureRow]) -> Iterable[KeyedBatch]:
        serialized = self._encoder.encode(rows_to_record_batch(self._spec, rows, self._with_label))
        self._encoded.inc(len(serialized))
        return [KeyedBatch(tuple(RequestKey(row.event.event_id, row.event.time_us) for row in rows),
                           tuple(serialized))]


class _EncodeRecordBatchDoFn(beam.DoFn):
    """pa.RecordBatch -> its serialized tf.Examples, one per row."""

    def __init__(self):
        self._encoded = counters.EXAMPLES_ENCODED.metric()

    def setup(self):
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        self._encoder = RecordBatchToExamplesEncoder()

    def process(self, batch: pa.RecordBatch) -> Iterable[bytes]:
        serialized = self._encoder.encode(batch)
        self._encoded.inc(len(serialized))
        return serialized


class RecordBatches(beam.PTransform):
    """PCollection[FeatureRow] -> PCollection[pa.RecordBatch]: the rows in
    batches (`rows_to_record_batch`, every example column as a list column),
    what `EncodeRecordBatches` encodes and `FeatureStatistics` describes.
    The batch size adapts to the runner, up to max_batch_size rows."""

    def __init__(self, spec: FeatureSpec, with_label: bool = True, max_batch_size: int = 4096,
                 label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._with_label = with_label
        self._max_batch_size = max_batch_size

    def expand(self, rows):
        spec, with_label = self._spec, self._with_label
        return (
            rows
            | "Batch" >> beam.BatchElements(
                min_batch_size=min(64, self._max_batch_size), max_batch_size=self._max_batch_size)
            | "ToRecordBatch" >> beam.Map(lambda batch: rows_to_record_batch(spec, batch, with_label)
                                          ).with_output_types(pa.RecordBatch)
        )


class EncodeRecordBatches(beam.PTransform):
    """PCollection[pa.RecordBatch] -> PCollection[bytes] (serialized
    tf.train.Example, one per row), with tfx-bsl's C++ encoder."""

    def expand(self, batches):
        return batches | "Encode" >> beam.ParDo(_EncodeRecordBatchDoFn()).with_output_types(bytes)


class EncodeExamples(beam.PTransform):
    """PCollection[FeatureRow] -> PCollection[bytes] (serialized tf.train.Example),
    or with keyed=True PCollection[KeyedBatch]: each encoded batch as one
    element, its examples keyed by RequestKey (what the streaming job's
    RunInference takes as it comes: one model call per batch).

    Batches rows for the C++ encoder, up to max_batch_size; the batch size
    adapts to the runner (in streaming, a batch never waits beyond the
    bundle: BatchElements emits what it holds at the end of each bundle).
    Unkeyed, it is `RecordBatches` then `EncodeRecordBatches` (the batch job
    applies the two itself, to describe the same batches in stats.json)."""

    def __init__(self, spec: FeatureSpec, with_label: bool = True, keyed: bool = False, max_batch_size: int = 4096,
                 label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._with_label = with_label
        self._keyed = keyed
        self._max_batch_size = max_batch_size

    def expand(self, rows):
        if not self._keyed:
            return (
                rows
                | "RecordBatches" >> RecordBatches(self._spec, self._with_label, self._max_batch_size)
                | "Encode" >> EncodeRecordBatches()
            )
        return (
            rows
            | "Batch" >> beam.BatchElements(
                min_batch_size=min(64, self._max_batch_size), max_batch_size=self._max_batch_size)
            | "Encode" >> beam.ParDo(_EncodeKeyedBatchDoFn(self._spec, self._with_label)).with_output_types(
                KeyedBatch)
        )
