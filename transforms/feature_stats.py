"""Training statistics of the encoded examples (`stats.json`), computed from
the very RecordBatches the encoder turns into tf.Examples.

What is described: every example column the model reads as a value
(`example_columns(spec)`: static request fields, windowed features, the
label). The id is not a feature; the presence flags are not features of their
own but decide "missing":

- a windowed feature other than a count, or an optional number, is missing
  where its `<name>_present` flag is 0 (its encoded 0 is not a value);
- an optional string is missing where the example leaves it out (an empty
  or null list); a count is always present; the label is present in every
  training example (a missing one would be counted as missing).

Per split, per column: count (present values), missing, missing_share, and
- numeric: mean, std (population), min, max, quantiles, a 20-bin histogram
  from min to max, zero_share (for a count: the share of empty windows);
- string: distinct, the 20 most frequent values, all values when few.

Everything is mergeable and bounded, so it runs as a Beam CombineFn over
batches in any order and any bundle split, with the same result bit for bit:

- sums are exact: a float32 value is an integer times a power of two, so the
  sum and the sum of squares are kept as Python integers on a fixed binary
  scale (int64 columns: plain integers). Mean and variance are rounded once,
  at the end: no cancellation, no dependence on merge order (Chan's merge
  of float moments is order dependent in the last bits);
- min, max, the zero count and string counts are exact; at most
  MAX_KEPT_VALUES distinct strings are kept per column (beyond that the most
  frequent ones stay, `values_complete` is false, `distinct` and the counts
  of the kept values are lower bounds, and which values were kept may depend
  on the merge order: the one exception to bit-for-bit);
- quantiles come from `QuantileSketch`, DDSketch-style logarithmic buckets
  (see its docstring for the guarantee); bucket counts merge exactly;
- the histogram has equal-width bins from the exact min to the exact max,
  which are known only once every batch is summarized. A fixed-bin histogram
  with exact counts cannot be merged from partial histograms with other
  bins, and no bounded summary of the first pass gives exact counts for bins
  chosen afterwards; so the histogram is a second pass over the same batches
  (numeric columns only), with the first pass's min/max as a side input.
  It costs one more read of the batches' numeric columns, not of the data.

The arithmetic is plain numpy on pyarrow RecordBatches (`summarize_batch`,
`histogram_counts`, `split_statistics`, `compute_statistics`); the Beam layer
at the end (`FeatureStatistics`) only wires it:

    PCollection[pa.RecordBatch] (one split) | FeatureStatistics(spec) -> PCollection[dict] (exactly one element)
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import typehints

from transforms.examples import example_columns
from transforms.spec import FeatureSpec, presence_name

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 20
TOP_VALUES = 20
MAX_LISTED_VALUES = 1000  # "values" lists every distinct string up to this many
MAX_KEPT_VALUES = 10_000  # distinct strings kept per column and split
RELATIVE_ACCURACY = 0.005
ZERO_THRESHOLD = 1e-9  # |x| below this lands in the sketch's zero bucket

_STATS_ROLES = ("static", "windowed", "label")
# float32 = m * 2**(e - 24), m an integer below 2**24, e >= -148 (subnormals included):
# scaled by these, a value and its square are integers.
_F32_SHIFT = 24 + 148
_F32_SQUARE_SHIFT = 2 * _F32_SHIFT
_CHUNK = 1 << 14  # sums of up to 2**14 squared 24-bit significands fit in int64


class StatsColumn(NamedTuple):
    """An example column described in stats.json."""

    name: str
    role: str  # "static" | "windowed" | "label"
    dtype: str  # "bytes" | "int64" | "float32", as encoded
    flag: Optional[str]  # its `<name>_present` column, where that decides "missing"

    @property
    def type(self) -> str:
        return "string" if self.dtype == "bytes" else "numeric"


def stats_columns(spec: FeatureSpec) -> tuple[StatsColumn, ...]:
    columns = example_columns(spec)
    names = {column.name for column in columns}
    return tuple(
        StatsColumn(c.name, c.role, c.dtype, presence_name(c.name) if presence_name(c.name) in names else None)
        for c in columns if c.role in _STATS_ROLES)


# ---- exact sums ------------------------------------------------------------

def _scaled_sum(ints: np.ndarray, shifts: np.ndarray) -> int:
    """sum(ints[i] * 2**shifts[i]) exactly, ints int64, shifts >= 0."""
    if not len(ints):
        return 0
    order = np.argsort(shifts, kind="stable")
    ordered_shifts = shifts[order]
    starts = np.flatnonzero(np.r_[True, ordered_shifts[1:] != ordered_shifts[:-1]])
    sums = np.add.reduceat(ints[order], starts)
    return sum(int(total) << int(shift) for total, shift in zip(sums, ordered_shifts[starts]))


def exact_sums(values: np.ndarray) -> tuple[int, int]:
    """(sum, sum of squares) of float32 or int64 values, exactly, as integers:
    scaled by 2**_F32_SHIFT and 2**_F32_SQUARE_SHIFT for float32, unscaled for int64."""
    total = squares = 0
    for start in range(0, len(values), _CHUNK):
        chunk = values[start:start + _CHUNK]
        if chunk.dtype == np.float32:
            fraction, exponent = np.frexp(chunk.astype(np.float64))
            significand = (fraction * (1 << 24)).astype(np.int64)  # exact: float32 has 24 significant bits
            exponent = exponent.astype(np.int64)
            total += _scaled_sum(significand, exponent - 24 + _F32_SHIFT)
            squares += _scaled_sum(significand * significand, 2 * exponent - 48 + _F32_SQUARE_SHIFT)
        elif chunk.dtype == np.int64:
            if len(chunk) and int(np.abs(chunk).max()) < (1 << 24):  # squares and their sum fit in int64
                total += int(chunk.sum())
                squares += int((chunk * chunk).sum())
            else:
                as_int = [int(v) for v in chunk]
                total += sum(as_int)
                squares += sum(v * v for v in as_int)
        else:
            raise ValueError(f"exact sums of float32 or int64 values, got {chunk.dtype}")
    return total, squares


# ---- the quantile sketch ---------------------------------------------------

def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts)


def quantile_index(n: int, q: float) -> int:
    """The 0-based order statistic the quantile q names among n values: the
    lower inverse of the empirical CDF, numpy's method="inverted_cdf"
    (the same float arithmetic: ceil(n*q - 1), clipped)."""
    return int(min(max(math.ceil(n * q - 1), 0), n - 1))


class QuantileSketch:
    """DDSketch-style quantiles of float values, mergeable, deterministic.

    A value x with |x| >= zero_threshold goes to bucket i = ceil(log_gamma |x|)
    (gamma = (1 + a) / (1 - a), a the relative accuracy; negative values to a
    mirrored set of buckets), smaller ones to the zero bucket. A bucket stands
    for 2 gamma**i / (gamma + 1), within a relative a of every value in
    (gamma**(i-1), gamma**i]. The bucket depends on the value only, and counts
    add exactly, so the sketch of some values is the same however they were
    split and merged.

    Guarantee: `quantile(q)` is within a relative a of the order statistic
    `np.quantile(values, q, method="inverted_cdf")` (within zero_threshold
    of it where that statistic is below zero_threshold in magnitude), up to
    the rounding of one log (~1e-15). Estimates are clamped to the exact min
    and max, which only brings them closer.

    Memory: one (key, count) per non-empty bucket, at most
    log_gamma(max|x| / zero_threshold) per sign: about 11,000 for all of
    float32's range at a = 0.5%, whatever the number of values.
    """

    def __init__(self, relative_accuracy: float = RELATIVE_ACCURACY, zero_threshold: float = ZERO_THRESHOLD):
        if not 0 < relative_accuracy < 1:
            raise ValueError(f"relative accuracy in (0, 1), got {relative_accuracy}")
        self.relative_accuracy = relative_accuracy
        self.zero_threshold = zero_threshold
        self._gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        self.count = 0
        self.zeros = 0
        self.min: Optional[float] = None
        self.max: Optional[float] = None
        empty = np.zeros(0, np.int64)
        self.positive = (empty, empty)  # (bucket keys ascending, counts)
        self.negative = (empty, empty)  # keys of |x|

    def _keys(self, magnitudes: np.ndarray) -> np.ndarray:
        return np.ceil(np.log(magnitudes) / self._log_gamma).astype(np.int64)

    def add(self, values: np.ndarray) -> "QuantileSketch":
        values = np.asarray(values, dtype=np.float64)
        if not len(values):
            return self
        if not np.isfinite(values).all():
            raise ValueError("the quantile sketch takes finite values only")
        magnitude = np.abs(values)
        small = magnitude < self.zero_threshold
        for sign, side in ((values > 0, "positive"), (values < 0, "negative")):
            keys = self._keys(magnitude[sign & ~small])
            if len(keys):
                old_keys, old_counts = getattr(self, side)
                setattr(self, side, _sum_by_key(np.concatenate([old_keys, keys]),
                                                np.concatenate([old_counts, np.ones(len(keys), np.int64)])))
        self.zeros += int(small.sum())
        self.count += len(values)
        low, high = float(values.min()), float(values.max())
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)
        return self

    def merge(self, other: "QuantileSketch") -> "QuantileSketch":
        """Adds other's counts into this sketch (same accuracy and zero threshold)."""
        if (other.relative_accuracy, other.zero_threshold) != (self.relative_accuracy, self.zero_threshold):
            raise ValueError("sketches of different accuracy cannot merge")
        if not other.count:
            return self
        for side in ("positive", "negative"):
            (a_keys, a_counts), (b_keys, b_counts) = getattr(self, side), getattr(other, side)
            if len(b_keys):
                setattr(self, side, _sum_by_key(np.concatenate([a_keys, b_keys]),
                                                np.concatenate([a_counts, b_counts])))
        self.zeros += other.zeros
        self.count += other.count
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)
        return self

    def quantiles(self, qs: Sequence[float]) -> Optional[list[float]]:
        """The estimates at qs, or None for an empty sketch."""
        if not self.count:
            return None
        neg_keys, neg_counts = self.negative
        pos_keys, pos_counts = self.positive
        # Buckets in ascending order of value: most negative first.
        representative = 2 / (self._gamma + 1)
        values = np.concatenate([-representative * self._gamma ** neg_keys[::-1].astype(np.float64), [0.0],
                                 representative * self._gamma ** pos_keys.astype(np.float64)])
        cumulative = np.cumsum(np.concatenate([neg_counts[::-1], [self.zeros], pos_counts]))
        out = []
        for q in qs:
            bucket = int(np.searchsorted(cumulative, quantile_index(self.count, q), side="right"))
            out.append(float(min(max(values[bucket], self.min), self.max)))
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return ((self.relative_accuracy, self.zero_threshold, self.count, self.zeros, self.min, self.max)
                == (other.relative_accuracy, other.zero_threshold, other.count, other.zeros, other.min, other.max)
                and all(np.array_equal(a, b) for a, b in zip((*self.positive, *self.negative),
                                                              (*other.positive, *other.negative))))


# ---- per-column summaries ----------------------------------------------------

@dataclasses.dataclass
class NumericSummary:
    """Exact moments (see exact_sums for the scale), extremes and zeros, and the sketch."""

    dtype: str
    count: int = 0
    missing: int = 0
    zeros: int = 0
    total: int = 0
    squares: int = 0
    sketch: QuantileSketch = dataclasses.field(default_factory=QuantileSketch)

    def add(self, values: np.ndarray, missing: int) -> None:
        total, squares = exact_sums(values)
        self.total += total
        self.squares += squares
        self.count += len(values)
        self.missing += missing
        self.zeros += int(np.count_nonzero(values == 0))
        self.sketch.add(values)

    def merge(self, other: "NumericSummary") -> None:
        self.count += other.count
        self.missing += other.missing
        self.zeros += other.zeros
        self.total += other.total
        self.squares += other.squares
        self.sketch.merge(other.sketch)

    @property
    def min(self):
        return self._native(self.sketch.min)

    @property
    def max(self):
        return self._native(self.sketch.max)

    def _native(self, value: Optional[float]):
        if value is None:
            return None
        return int(value) if self.dtype == "int64" else float(value)

    def mean_std(self) -> tuple[Optional[float], Optional[float]]:
        if not self.count:
            return None, None
        shift = _F32_SHIFT if self.dtype == "float32" else 0
        n = self.count
        mean = Fraction(self.total, n << shift)
        variance = Fraction(n * self.squares - self.total * self.total, (n * n) << (2 * shift))
        return float(mean), math.sqrt(float(variance))


@dataclasses.dataclass
class StringSummary:
    """Exact counts of each value (bytes), at most MAX_KEPT_VALUES of them."""

    count: int = 0
    missing: int = 0
    counts: dict = dataclasses.field(default_factory=dict)
    truncated: bool = False

    def add_counts(self, counts: Mapping[bytes, int], present: int, missing: int) -> None:
        for value, n in counts.items():
            self.counts[value] = self.counts.get(value, 0) + n
        self.count += present
        self.missing += missing
        self._cap()

    def merge(self, other: "StringSummary") -> None:
        self.add_counts(other.counts, other.count, other.missing)
        self.truncated |= other.truncated

    def _cap(self) -> None:
        if len(self.counts) > MAX_KEPT_VALUES:
            kept = sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:MAX_KEPT_VALUES]
            self.counts = dict(kept)
            self.truncated = True


@dataclasses.dataclass
class SplitSummary:
    """The first pass over one split: examples and a summary per column."""

    examples: int
    columns: dict  # name -> NumericSummary | StringSummary

    @classmethod
    def empty(cls, columns: Sequence[StatsColumn]) -> "SplitSummary":
        return cls(0, {c.name: NumericSummary(c.dtype) if c.type == "numeric" else StringSummary() for c in columns})

    def merge(self, other: "SplitSummary") -> "SplitSummary":
        """Adds other into this summary (in place) and returns it."""
        self.examples += other.examples
        for name, summary in self.columns.items():
            summary.merge(other.columns[name])
        return self


def column_values(column: StatsColumn, batch: pa.RecordBatch) -> tuple[Any, int]:
    """(present values, missing count) of one column of an encoded batch:
    numeric values as a numpy array of the encoded dtype, strings as a pyarrow
    binary array. Raises on a cell with more than one value."""
    cells = batch.column(column.name)
    lengths = pc.fill_null(pc.list_value_length(cells), 0).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.max() > 1:
        raise ValueError(f"{column.name}: one value per example expected")
    values = cells.flatten()
    if column.flag is not None:
        flags = batch.column(column.flag).flatten().to_numpy(zero_copy_only=False)
        if len(flags) != batch.num_rows or len(values) != batch.num_rows:
            raise ValueError(f"{column.name}: a flagged column has one value in every example")
        keep = flags == 1
        values = values.filter(pa.array(keep))
        missing = batch.num_rows - int(keep.sum())
    else:
        missing = batch.num_rows - len(values)
    if column.type == "numeric":
        values = values.to_numpy(zero_copy_only=False)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"{column.name}: a value that is not finite")
    return values, missing


def summarize_batch(columns: Sequence[StatsColumn], batch: pa.RecordBatch) -> SplitSummary:
    """One encoded RecordBatch -> its SplitSummary."""
    summary = SplitSummary.empty(columns)
    summary.examples = batch.num_rows
    for column in columns:
        values, missing = column_values(column, batch)
        target = summary.columns[column.name]
        if column.type == "numeric":
            target.add(values, missing)
        else:
            counted = pc.value_counts(values) if len(values) else None
            counts = {} if counted is None else dict(zip(counted.field("values").to_pylist(),
                                                         counted.field("counts").to_pylist()))
            target.add_counts(counts, len(values), missing)
    return summary


def numeric_ranges(summary: Optional[SplitSummary]) -> dict[str, tuple[float, float]]:
    """{numeric column: (min, max)} of the columns with a value: the histogram's range."""
    if summary is None:
        return {}
    return {name: (float(s.sketch.min), float(s.sketch.max)) for name, s in summary.columns.items()
            if isinstance(s, NumericSummary) and s.count}


def numeric_projection(columns: Sequence[StatsColumn], batch: pa.RecordBatch) -> pa.RecordBatch:
    """The columns the histogram pass reads (numeric values and their flags)."""
    names = []
    for column in columns:
        if column.type == "numeric":
            names += [column.name] + ([column.flag] if column.flag else [])
    return batch.select(names)


def histogram_edges(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, HISTOGRAM_BINS + 1)


def histogram_counts(columns: Sequence[StatsColumn], batch: pa.RecordBatch,
                     ranges: Mapping[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """{numeric column: counts per bin} of one batch, with np.histogram's bins
    (the last one closed) on `histogram_edges` of the column's range."""
    counts = {}
    for column in columns:
        if column.type == "numeric" and column.name in ranges:
            values, _ = column_values(column, batch)
            counts[column.name] = np.histogram(values.astype(np.float64), bins=histogram_edges(*ranges[column.name])
                                               )[0].astype(np.int64)
    return counts


def add_histograms(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: a.get(name, 0) + b.get(name, 0) for name in {*a, *b}}


def _share(part: int, whole: int) -> Optional[float]:
    return part / whole if whole else None


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def split_statistics(columns: Sequence[StatsColumn], summary: Optional[SplitSummary],
                     histograms: Mapping[str, np.ndarray]) -> dict:
    """One split's entry of stats.json (JSON-ready)."""
    summary = summary if summary is not None else SplitSummary.empty(columns)
    features = {}
    for column in columns:
        s = summary.columns[column.name]
        entry = {"role": column.role, "type": column.type, "count": s.count, "missing": s.missing,
                 "missing_share": _share(s.missing, s.count + s.missing)}
        if column.type == "numeric":
            mean, std = s.mean_std()
            hist = histograms.get(column.name) if s.count else None
            entry.update({
                "mean": mean, "std": std, "min": s.min, "max": s.max,
                "quantiles": s.sketch.quantiles(QUANTILES),
                "histogram": None if hist is None else {
                    "edges": [float(edge) for edge in histogram_edges(float(s.sketch.min), float(s.sketch.max))],
                    "counts": [int(n) for n in hist]},
                "zero_share": _share(s.zeros, s.count),
            })
        else:
            ranked = sorted(s.counts.items(), key=lambda item: (-item[1], item[0]))
            complete = not s.truncated and len(s.counts) <= MAX_LISTED_VALUES
            entry.update({
                "distinct": len(s.counts),
                "top": [{"value": _decode(v), "count": n, "share": n / s.count} for v, n in ranked[:TOP_VALUES]],
                **({"values": {_decode(v): s.counts[v] for v in sorted(s.counts)}} if complete else {}),
                "values_complete": complete,
            })
        features[column.name] = entry
    return {"examples": summary.examples, "features": features}


def statistics_document(spec: FeatureSpec, splits: Mapping[str, dict]) -> dict:
    """stats.json: {"spec", "quantiles", "splits": {split: split_statistics}}."""
    return {"spec": {"name": spec.name, "fingerprint": spec.fingerprint}, "quantiles": list(QUANTILES),
            "splits": dict(splits)}


def compute_statistics(spec: FeatureSpec, batches: Iterable[pa.RecordBatch]) -> dict:
    """The whole computation on batches in memory (both passes): one split's entry."""
    columns = stats_columns(spec)
    batches = list(batches)
    summary = SplitSummary.empty(columns)
    for batch in batches:
        summary.merge(summarize_batch(columns, batch))
    ranges = numeric_ranges(summary)
    histograms: dict = {}
    for batch in batches:
        histograms = add_histograms(histograms, histogram_counts(columns, batch, ranges))
    return split_statistics(columns, summary, histograms)


# ---- Beam ------------------------------------------------------------------

_KEY = "stats"  # a str key: a deterministic coder for the combine's shuffle


class _SummarizeFn(beam.CombineFn):
    """RecordBatch -> SplitSummary of all of them."""

    def __init__(self, columns: Sequence[StatsColumn]):
        self._columns = tuple(columns)

    def create_accumulator(self) -> SplitSummary:
        return SplitSummary.empty(self._columns)

    def add_input(self, accumulator: SplitSummary, batch: pa.RecordBatch) -> SplitSummary:
        return accumulator.merge(summarize_batch(self._columns, batch))

    def merge_accumulators(self, accumulators: Iterable[SplitSummary]) -> SplitSummary:
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: SplitSummary) -> SplitSummary:
        return accumulator


class _SumHistogramsFn(beam.CombineFn):
    """{column: counts} per batch -> their sum."""

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, accumulator: dict, counts: dict) -> dict:
        return add_histograms(accumulator, counts)

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        merged: dict = {}
        for accumulator in accumulators:
            merged = add_histograms(merged, accumulator)
        return merged

    def extract_output(self, accumulator: dict) -> dict:
        return accumulator


def _keyed(pcoll, label: str):
    return pcoll | label >> beam.Map(lambda value: (_KEY, value)).with_output_types(typehints.KV[str, Any])


class FeatureStatistics(beam.PTransform):
    """PCollection[pa.RecordBatch] (one split's encoded batches, label included)
    -> PCollection[dict]: exactly one element, the split's entry of stats.json
    (`split_statistics`), also for an empty split.

    Two combines: the summary (moments, extremes, sketch, string counts), then
    the histogram over the numeric columns of the same batches with the
    summary's min/max as a side input (why: the module docstring)."""

    def __init__(self, spec: FeatureSpec, label: Optional[str] = None):
        super().__init__(label)
        self._columns = stats_columns(spec)

    def expand(self, batches):
        columns = self._columns
        summary = (
            _keyed(batches, "KeyBatches")
            | "Summarize" >> beam.CombinePerKey(_SummarizeFn(columns))
            | "Summary" >> beam.Values()
        )
        ranges = summary | "Ranges" >> beam.Map(numeric_ranges)
        histograms = (
            _keyed(
                batches
                | "NumericColumns" >> beam.Map(lambda batch: numeric_projection(columns, batch))
                | "Histogram" >> beam.Map(lambda batch, ranges_: histogram_counts(columns, batch, ranges_),
                                          beam.pvalue.AsSingleton(ranges, default_value={})),
                "KeyHistograms")
            | "SumHistograms" >> beam.CombinePerKey(_SumHistogramsFn())
            | "Histograms" >> beam.Values()
        )
        return (
            batches.pipeline
            | "Once" >> beam.Create([None])
            | "Statistics" >> beam.Map(lambda _, summary_, histograms_: split_statistics(columns, summary_, histograms_),
                                       beam.pvalue.AsSingleton(summary, default_value=None),
                                       beam.pvalue.AsSingleton(histograms, default_value={}))
        )
