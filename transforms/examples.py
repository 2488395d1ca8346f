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
itself, `rows_to_record_batch` (transforms/split.py, `SplitRecordBatches`)
then `EncodeRecordBatches` (-> bytes), so that `transforms/feature_stats.py`
describes the very batches that are encoded; `EncodeExamples` is the two in
one for scoring: it encodes from the rows, which carry the key, and emits
each encoded batch as one `KeyedBatch`, what RunInference takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def _list_column(values: pa.Array) -> pa.Array:
    """One value per row -> a list column of that one value; a null becomes
    a null list (the feature is left out of that example)."""
    if not values.null_count:
        return pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32)), values)
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(valid, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.drop_null(), mask=pa.array(~valid))


def _sequence_column(sequences: pa.ListArray, size: int) -> pa.Array:
    """Up to `size` float64 values per row (null: no key value) -> a
    list<float32> column of exactly `size` values, 0-padded."""
    lengths = sequences.value_lengths().fill_null(0).to_numpy()
    padded = np.zeros((len(sequences), size), dtype=np.float32)
    # Row-major, as flatten() lists them; numpy rounds float64 to float32.
    padded[np.arange(size) < lengths[:, None]] = sequences.flatten().to_numpy()
    offsets = np.arange(0, padded.size + 1, size, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(padded.ravel()))


def rows_to_record_batch(spec: FeatureSpec, rows: Sequence[FeatureRow], with_label: bool = True) -> pa.RecordBatch:
    """FeatureRows -> a RecordBatch with one list column per example column."""
    # Every example the jobs write goes through here: each column is one
    # Python pass over the rows at most, its values converted by pyarrow.
    events = [row.event for row in rows]
    fields = [event.fields for event in events]
    names = [f.name for f in spec.windowed_features]
    windowed = dict(zip(names, list(zip(*(row.features for row in rows))) or [()] * len(names)))
    flagged = {f.name for f in spec.request_fields if f.has_presence}
    valid = {}  # name -> BooleanArray, whether each row has a value: the flags
    sequences = {}
    arrays, columns = [], []
    for column in example_columns(spec):
        name = column.name
        if column.role == "label" and not with_label:
            continue
        if column.role == "id":
            values = pa.array([event.event_id for event in events], pa.binary())  # str: UTF-8, as .encode()
        elif column.role in ("static", "label"):
            values = pa.array([row_fields.get(name) for row_fields in fields], _ARROW[column.dtype])
            valid[name] = values.is_valid()
            if name in flagged:  # missing: 0 here, 0 in its flag
                values = values.fill_null(0)
        elif column.role in ("static_presence", "presence"):
            values = valid[name.removesuffix(PRESENCE_SUFFIX)].cast(pa.int64())
        elif column.role == "sequence":
            sequences[name] = pa.array(windowed[name], pa.list_(pa.float64()))
            valid[name] = sequences[name].is_valid()
            arrays.append(_sequence_column(sequences[name], column.size))
            columns.append(name)
            continue
        elif column.role == "length":
            values = sequences[name.removesuffix(LENGTH_SUFFIX)].value_lengths().fill_null(0).cast(pa.int64())
        else:
            integer = column.dtype == "int64"
            values = pa.array(windowed[name], pa.float64() if integer else pa.float32())
            valid[name] = values.is_valid()
            values = values.fill_null(0)  # an empty window: 0, and 0 in its flag
            if integer:  # counts come as floats: int(v), which truncates (and fails on nan/inf, as the cast does)
                values = pc.trunc(values).cast(pa.int64())
        arrays.append(_list_column(values))
        columns.append(name)
    return pa.RecordBatch.from_arrays(arrays, columns)


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
    """pa.RecordBatch -> the list of its serialized tf.Examples, one per row, as one element."""

    def __init__(self):
        self._encoded = counters.EXAMPLES_ENCODED.metric()

    def setup(self):
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        self._encoder = RecordBatchToExamplesEncoder()

    def process(self, batch: pa.RecordBatch) -> Iterable[list]:
        serialized = self._encoder.encode(batch)
        self._encoded.inc(len(serialized))
        return [serialized]


class EncodeRecordBatches(beam.PTransform):
    """PCollection[pa.RecordBatch] -> PCollection[list[bytes]]: each batch's
    serialized tf.train.Examples, one per row, as one element (what
    transforms/tfrecord_files.py writes), with tfx-bsl's C++ encoder."""

    def expand(self, batches):
        return batches | "Encode" >> beam.ParDo(_EncodeRecordBatchDoFn()).with_output_types(list)


class EncodeExamples(beam.PTransform):
    """PCollection[FeatureRow] -> PCollection[KeyedBatch]: each encoded batch
    as one element, its examples keyed by RequestKey (what RunInference takes
    as it comes: one model call per batch).

    Batches rows for the C++ encoder, up to max_batch_size; the batch size
    adapts to the runner (in streaming, a batch never waits beyond the
    bundle: BatchElements emits what it holds at the end of each bundle)."""

    def __init__(self, spec: FeatureSpec, with_label: bool = True, max_batch_size: int = 4096,
                 label: Optional[str] = None):
        super().__init__(label)
        self._spec = spec
        self._with_label = with_label
        self._max_batch_size = max_batch_size

    def expand(self, rows):
        return (
            rows
            | "Batch" >> beam.BatchElements(
                min_batch_size=min(64, self._max_batch_size), max_batch_size=self._max_batch_size)
            | "Encode" >> beam.ParDo(_EncodeKeyedBatchDoFn(self._spec, self._with_label)).with_output_types(
                KeyedBatch)
        )
