"""Train/eval/test assignment of examples, and the Beam step that routes them.

A time split cuts on the request time (UTC): nothing of the future leaks into
training. A hash split is stable per event_id across runs and machines.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import apache_beam as beam
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms import counters
from transforms.examples import is_labeled, rows_to_record_batch
from transforms.spec import SPLITS, FeatureSpec, SplitSpec

_US = 1_000_000


def assign_split(split: SplitSpec, time_us: int, event_id: str) -> str:
    """'train', 'eval' or 'test' for one request."""
    if split.method == "time":
        if time_us >= int(split.test_start.timestamp()) * _US:
            return "test"
        if time_us >= int(split.eval_start.timestamp()) * _US:
            return "eval"
        return "train"
    digest = hashlib.md5(event_id.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if position < split.test_fraction:
        return "test"
    if position < split.test_fraction + split.eval_fraction:
        return "eval"
    return "train"


class _SplitBatchesDoFn(beam.DoFn):
    """list[FeatureRow] -> pa.RecordBatch of up to max_rows labeled rows,
    tagged with their split; the unlabeled ones counted and left out. The
    rows of a bundle fill a batch per split, whatever lists they came in."""

    def __init__(self, spec: FeatureSpec, split: SplitSpec, max_rows: int):
        self._spec, self._split, self._max_rows = spec, split, max_rows
        self._counters = {name: counters.split_examples(name).metric() for name in SPLITS}
        self._unlabeled = counters.UNLABELED_REQUESTS.metric()

    def start_bundle(self):
        self._rows: dict[str, list] = {name: [] for name in SPLITS}

    def process(self, rows: list):
        spec, split, held = self._spec, self._split, self._rows
        unlabeled = 0
        for row in rows:
            if not is_labeled(spec, row):  # no outcome (a cancelled flight): cannot train
                unlabeled += 1
                continue
            name = assign_split(split, row.event.time_us, row.event.event_id)
            held[name].append(row)
            if len(held[name]) >= self._max_rows:
                yield beam.pvalue.TaggedOutput(name, self._batch(name))
        self._unlabeled.inc(unlabeled)

    def finish_bundle(self):
        for name in SPLITS:
            if self._rows[name]:
                yield beam.pvalue.TaggedOutput(name, WindowedValue(self._batch(name), MIN_TIMESTAMP, [GlobalWindow()]))

    def _batch(self, name: str) -> pa.RecordBatch:
        rows, self._rows[name] = self._rows[name], []
        self._counters[name].inc(len(rows))
        return rows_to_record_batch(self._spec, rows)


class SplitRecordBatches(beam.PTransform):
    """PCollection[list[FeatureRow]] -> {"train": ..., "eval": ..., "test": ...}
    of pa.RecordBatch (`rows_to_record_batch`, with the label): the labeled
    rows, split and counted, in batches of up to max_rows; the unlabeled ones
    counted (`unlabeled_requests`). One step over lists: the runner's cost is
    per element."""

    def __init__(self, spec: FeatureSpec, split: SplitSpec, max_rows: int = 4096, label: Optional[str] = None):
        super().__init__(label)
        self._spec, self._split, self._max_rows = spec, split, max_rows

    def expand(self, row_lists):
        outputs = row_lists | "SplitBatches" >> beam.ParDo(
            _SplitBatchesDoFn(self._spec, self._split, self._max_rows)).with_outputs(*SPLITS)
        return {name: outputs[name] for name in SPLITS}
